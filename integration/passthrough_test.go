package integration

// HTTP pass-through (SLUICE_HTTP_PASSTHROUGH, on by default): the requests
// that are not upgrades reach the app behind sluice as they would direct,
// streamed, on kept-alive connections that may upgrade later.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/gobwas/ws"
	gorilla "github.com/gorilla/websocket"
	dto "github.com/prometheus/client_model/go"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/internal/wstest"
	"github.com/sluice-proxy/sluice/proxy"
)

// downloadSize is the app's /download: large enough that holding it whole
// would show, and not a multiple of any buffer.
const downloadSize = 8<<20 + 7

// downloadBody is the app's /download, the same bytes every time.
func downloadBody() []byte {
	b := make([]byte, downloadSize)
	x := uint32(2463534242)
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}

// httpApp is an app as users run them: pages and a WebSocket on one port.
//
//	/health       200 "ok"
//	/echo         the request body back
//	/download     downloadSize bytes, with Content-Length
//	/sse          text/event-stream: event 1 at once, each next one when
//	              the test sends on sseNext, three in all
//	/headers      what the app saw, as JSON (Host, URI, header)
//	/ws, */ws     a gorilla WebSocket echo; with ?tell, its first message
//	              is the request URI it saw
type httpApp struct {
	srv     *httptest.Server
	url     string // ws://host:port, for SLUICE_UPSTREAM_URL
	sseNext chan struct{}
}

type seenRequest struct {
	Host   string
	URI    string
	Header http.Header
}

func startHTTPApp(t *testing.T) *httpApp {
	a := &httpApp{sseNext: make(chan struct{})}
	body := downloadBody()
	mux := http.NewServeMux()
	mux.HandleFunc("/health", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		// Read whole first: net/http's HTTP/1 server stops the body once
		// the answer has started.
		b, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", r.Header.Get("Content-Type"))
		w.Write(b)
	})
	mux.HandleFunc("/download", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		w.Write(body)
	})
	mux.HandleFunc("/sse", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		for i := 1; i <= 3; i++ {
			if i > 1 {
				select {
				case <-a.sseNext:
				case <-r.Context().Done():
					return
				}
			}
			fmt.Fprintf(w, "data: event %d\n\n", i)
			rc.Flush()
		}
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/ws" || strings.HasSuffix(r.URL.Path, "/ws") {
			up := gorilla.Upgrader{}
			c, err := up.Upgrade(w, r, nil)
			if err != nil {
				return
			}
			defer c.Close()
			if r.URL.Query().Has("tell") {
				c.WriteMessage(gorilla.TextMessage, []byte(r.URL.RequestURI()))
			}
			for {
				mt, msg, err := c.ReadMessage()
				if err != nil {
					return
				}
				if c.WriteMessage(mt, msg) != nil {
					return
				}
			}
		}
		json.NewEncoder(w).Encode(seenRequest{Host: r.Host, URI: r.RequestURI, Header: r.Header})
	})
	a.srv = httptest.NewServer(mux)
	a.url = "ws://" + a.srv.Listener.Addr().String()
	t.Cleanup(a.srv.Close)
	return a
}

// plainClient is an HTTP client that keeps nothing after the test.
func plainClient(t *testing.T) *http.Client {
	tr := &http.Transport{DisableCompression: true}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: wstest.IOTimeout}
}

// TestPassThroughRequests: a health check, a POST (sized and chunked), an
// 8 MiB download and a request's headers come through sluice as the app sent them, counted by
// status class.
func TestPassThroughRequests(t *testing.T) {
	app := startHTTPApp(t)
	s := startSluice(t, app.url, nil)
	c := plainClient(t)
	base := "http://" + s.addr

	resp, err := c.Get(base + "/health")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != "ok" {
		t.Fatalf("GET /health: %d %q, want 200 \"ok\"", resp.StatusCode, b)
	}

	post := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	resp, err = c.Post(base+"/echo", "application/x-test", bytes.NewReader(post))
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if !bytes.Equal(b, post) || resp.Header.Get("Content-Type") != "application/x-test" {
		t.Fatalf("POST /echo: %d bytes back (Content-Type %q), want the %d sent", len(b), resp.Header.Get("Content-Type"), len(post))
	}

	// A body of unknown length goes chunked, through sluice too.
	pr, pw := io.Pipe()
	go func() {
		for range 64 {
			pw.Write(post[:16<<10])
		}
		pw.Close()
	}()
	resp, err = c.Post(base+"/echo", "application/x-test", pr)
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if !bytes.Equal(b, bytes.Repeat(post[:16<<10], 64)) {
		t.Fatalf("chunked POST /echo: %d bytes back, want the %d sent", len(b), 64*16<<10)
	}

	resp, err = c.Get(base + "/download")
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	resp.Body.Close()
	if err != nil || n != downloadSize || !bytes.Equal(h.Sum(nil), sha256Of(downloadBody())) {
		t.Fatalf("GET /download: %d bytes (err %v), want %d identical bytes", n, err, downloadSize)
	}

	req, _ := http.NewRequest("GET", base+"/where?x=1", nil)
	req.Header.Set("X-App", "kept")
	req.Header.Set("X-Forwarded-For", "198.51.100.9") // from an untrusted peer: not believed
	resp, err = c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var seen seenRequest
	json.NewDecoder(resp.Body).Decode(&seen)
	resp.Body.Close()
	appHost := app.srv.Listener.Addr().String()
	if seen.Host != appHost || seen.URI != "/where?x=1" || seen.Header.Get("X-App") != "kept" ||
		seen.Header.Get("X-Forwarded-Host") != s.addr || seen.Header.Get("X-Forwarded-Proto") != "http" {
		t.Errorf("the app saw Host %q, URI %q, header %v; want Host %q, URI /where?x=1, X-App, X-Forwarded-Host %s, X-Forwarded-Proto http",
			seen.Host, seen.URI, seen.Header, appHost, s.addr)
	}
	// As an upgrade forwards it: the received list, then the peer.
	if got := seen.Header.Get("X-Forwarded-For"); got != "198.51.100.9, 127.0.0.1" {
		t.Errorf("X-Forwarded-For at the app = %q, want \"198.51.100.9, 127.0.0.1\", as for an upgrade", got)
	}

	if got := metricValue(t, s, "sluice_http_requests_total", "code", "2xx"); got != 5 {
		t.Errorf("sluice_http_requests_total{code=\"2xx\"} = %v, want 5", got)
	}
	if got := histogramCount(t, s, "sluice_http_request_duration_seconds"); got != 5 {
		t.Errorf("sluice_http_request_duration_seconds count = %d, want 5", got)
	}
}

func sha256Of(b []byte) []byte {
	s := sha256.Sum256(b)
	return s[:]
}

// histogramCount is the sample count of the histogram name in s's registry.
func histogramCount(t *testing.T, s *sluiceUnderTest, name string) uint64 {
	t.Helper()
	families, err := s.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == name && f.GetType() == dto.MetricType_HISTOGRAM && len(f.GetMetric()) == 1 {
			return f.GetMetric()[0].GetHistogram().GetSampleCount()
		}
	}
	t.Fatalf("no histogram %s", name)
	return 0
}

// TestPassThroughSSEStreams: each event reaches the client while the app
// still holds the stream open, before the app writes the next.
func TestPassThroughSSEStreams(t *testing.T) {
	app := startHTTPApp(t)
	s := startSluice(t, app.url, nil)
	resp, err := plainClient(t).Get("http://" + s.addr + "/sse")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("Content-Type = %q", ct)
	}
	br := bufio.NewReader(resp.Body)
	for i := 1; i <= 3; i++ {
		if i > 1 {
			// The app writes event i only now: had sluice held event i-1,
			// the read below would time out.
			app.sseNext <- struct{}{}
		}
		line, err := br.ReadString('\n')
		if err != nil || line != fmt.Sprintf("data: event %d\n", i) {
			t.Fatalf("event %d: read %q, %v", i, line, err)
		}
		if blank, _ := br.ReadString('\n'); blank != "\n" {
			t.Fatalf("event %d: not followed by a blank line: %q", i, blank)
		}
	}
}

// rawHTTP is a client connection that writes requests by hand and reads
// the answers, to see what happens on one kept-alive connection.
type rawHTTP struct {
	c  net.Conn
	br *bufio.Reader
}

func dialRaw(t *testing.T, addr string) *rawHTTP {
	c, err := net.DialTimeout("tcp", addr, wstest.IOTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(wstest.IOTimeout))
	return &rawHTTP{c: c, br: bufio.NewReader(c)}
}

// get sends a GET for path and returns the answer's status and body.
func (r *rawHTTP) get(t *testing.T, path string) (int, string) {
	t.Helper()
	if _, err := fmt.Fprintf(r.c, "GET %s HTTP/1.1\r\nHost: app\r\n\r\n", path); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(r.br, nil)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp.StatusCode, string(b)
}

// upgrade sends prefix (a PROXY header, or nothing), then an upgrade
// request for path, and wants 101 with the right Sec-WebSocket-Accept;
// what names the request in a failure.
func (r *rawHTTP) upgrade(t *testing.T, prefix []byte, path, what string) {
	t.Helper()
	key := wstest.NewKey()
	req := fmt.Appendf(prefix, "GET %s HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n\r\n", path, key)
	if _, err := r.c.Write(req); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	resp, err := http.ReadResponse(r.br, nil)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Sec-WebSocket-Accept") != wstest.AcceptKey(key) {
		t.Fatalf("%s: %d %v, want 101 with the key's accept", what, resp.StatusCode, resp.Header)
	}
}

// TestPassThroughKeepAliveThenUpgrade: plain requests, then an upgrade, on
// one connection, with one connection allowed per client address: the
// upgrade takes over the connection's place and its WebSocket works.
func TestPassThroughKeepAliveThenUpgrade(t *testing.T) {
	app := startHTTPApp(t)
	s := startSluiceEnv(t, app.url, map[string]string{config.Prefix + "MAX_CONNECTIONS_PER_IP": "1"}, nil)
	r := dialRaw(t, s.addr)
	for range 2 {
		if code, body := r.get(t, "/health"); code != 200 || body != "ok" {
			t.Fatalf("GET /health on the kept-alive connection: %d %q", code, body)
		}
	}
	r.upgrade(t, nil, "/ws", "upgrade after two plain requests")
	r.c.Write(wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpText, Masked: true, Payload: []byte("after keep-alive")}))
	f, err := wstest.ReadFrame(r.br)
	if err != nil || string(f.Payload) != "after keep-alive" {
		t.Fatalf("echo through the upgraded connection: %v %v", f, err)
	}
	if n := s.srv.Sessions(); n != 1 {
		t.Errorf("Sessions() = %d, want 1", n)
	}
}

// TestPassThroughCountsTowardLimits: a kept-alive pass-through connection
// holds a place under SLUICE_MAX_CONNECTIONS until it closes.
func TestPassThroughCountsTowardLimits(t *testing.T) {
	app := startHTTPApp(t)
	s := startSluiceEnv(t, app.url, map[string]string{config.Prefix + "MAX_CONNECTIONS": "1"}, nil)
	first := dialRaw(t, s.addr)
	if code, _ := first.get(t, "/health"); code != 200 {
		t.Fatalf("first connection: %d", code)
	}
	second := dialRaw(t, s.addr)
	if code, body := second.get(t, "/health"); code != http.StatusServiceUnavailable {
		t.Fatalf("second connection while the first is open: %d %q, want 503", code, body)
	}
	first.c.Close()
	// sluice notices the close when its read returns: try again until
	// then, within the test's bound.
	deadline := time.Now().Add(wstest.IOTimeout)
	for {
		code, _ := dialRaw(t, s.addr).get(t, "/health")
		if code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the first connection closed: still %d", code)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestPassThroughDrain: Shutdown closes kept-alive pass-through
// connections and returns.
func TestPassThroughDrain(t *testing.T) {
	app := startHTTPApp(t)
	s := startSluice(t, app.url, nil)
	r := dialRaw(t, s.addr)
	if code, _ := r.get(t, "/health"); code != 200 {
		t.Fatalf("GET /health: %d", code)
	}
	ctx, cancel := context.WithTimeout(context.Background(), wstest.ShutdownTimeout)
	defer cancel()
	if err := s.shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if _, err := r.br.ReadByte(); err != io.EOF {
		t.Errorf("idle kept-alive connection after Shutdown: read %v, want EOF", err)
	}
}

// TestPassThroughUpstreamDown: with the app gone, a plain request gets 502,
// counted as 5xx.
func TestPassThroughUpstreamDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gone := ln.Addr().String()
	ln.Close()
	s := startSluice(t, "ws://"+gone, nil)
	resp, err := plainClient(t).Get("http://" + s.addr + "/health")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway {
		t.Errorf("status = %d, want 502", resp.StatusCode)
	}
	if got := metricValue(t, s, "sluice_http_requests_total", "code", "5xx"); got != 1 {
		t.Errorf("sluice_http_requests_total{code=\"5xx\"} = %v, want 1", got)
	}
}

// TestUpstreamPathPrefix: the upstream URL's path is a prefix of every
// request's, for upgrades and plain requests alike (README, "Upstream
// paths").
func TestUpstreamPathPrefix(t *testing.T) {
	app := startHTTPApp(t)
	s := startSluice(t, app.url+"/base", nil)
	resp, err := plainClient(t).Get("http://" + s.addr + "/who?x=1")
	if err != nil {
		t.Fatal(err)
	}
	var seen seenRequest
	json.NewDecoder(resp.Body).Decode(&seen)
	resp.Body.Close()
	if seen.URI != "/base/who?x=1" {
		t.Errorf("plain request: the app saw %q, want /base/who?x=1", seen.URI)
	}
	c, _, err := gorilla.DefaultDialer.Dial(s.url+"/ws?tell", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(wstest.IOTimeout))
	_, uri, err := c.ReadMessage()
	if err != nil || string(uri) != "/base/ws?tell" {
		t.Errorf("upgrade: the app saw %q (%v), want /base/ws?tell", uri, err)
	}
}

// TestPassThroughTLSUpstream: with a wss:// upstream, plain requests go to
// its https:// origin, trusting the CA that upgrades trust.
func TestPassThroughTLSUpstream(t *testing.T) {
	app := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "tls=%v path=%s", r.TLS != nil, r.URL.Path)
	}))
	t.Cleanup(app.Close)
	pool := x509.NewCertPool()
	pool.AddCert(app.Certificate())
	s := startSluice(t, "wss://"+app.Listener.Addr().String(), func(o *proxy.Options) {
		o.UpstreamTLS = &tls.Config{RootCAs: pool}
	})
	resp, err := plainClient(t).Get("http://" + s.addr + "/secure")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != "tls=true path=/secure" {
		t.Errorf("through sluice to an https origin: %d %q", resp.StatusCode, b)
	}
}

// TestPassThroughFullDuplex: an app that answers while the request body
// still arrives (a streaming echo, as Node's req.pipe(res)) gets the whole
// body through sluice. net/http's server stops reading a request body once
// the answer has begun, unless full duplex is asked for; CI saw a 1 MiB
// echo through sluice come back as its first 32 KiB.
func TestPassThroughFullDuplex(t *testing.T) {
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		if err := rc.EnableFullDuplex(); err != nil {
			t.Errorf("app: %v", err)
		}
		w.WriteHeader(http.StatusOK)
		rc.Flush() // the answer begins before the body is read
		buf := make([]byte, 8<<10)
		for {
			n, err := r.Body.Read(buf)
			w.Write(buf[:n])
			rc.Flush()
			if err != nil {
				return
			}
		}
	}))
	t.Cleanup(app.Close)
	s := startSluice(t, "ws://"+app.Listener.Addr().String(), nil)
	c := plainClient(t)
	body := bytes.Repeat([]byte("full duplex "), 100_000) // 1.2 MB
	// The body arrives in pieces, each after the echo of the one before:
	// the answer has long begun when the rest comes.
	pr, pw := io.Pipe()
	echoed := make(chan int, 1)
	go func() {
		for off := 0; off < len(body); off += 64 << 10 {
			if _, err := pw.Write(body[off:min(off+64<<10, len(body))]); err != nil {
				return
			}
			select {
			case <-echoed:
			case <-time.After(time.Second):
			}
		}
		pw.Close()
	}()
	resp, err := c.Post("http://"+s.addr+"/echo", "application/octet-stream", pr)
	if err != nil {
		t.Fatal(err)
	}
	var got []byte
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.Body.Read(buf)
		got = append(got, buf[:n]...)
		if len(got)%(64<<10) == 0 && n > 0 {
			select {
			case echoed <- len(got):
			default:
			}
		}
		if err != nil {
			break
		}
	}
	resp.Body.Close()
	if !bytes.Equal(got, body) {
		t.Errorf("streamed echo through sluice: %d bytes back, want the %d sent", len(got), len(body))
	}
}
