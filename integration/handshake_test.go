package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/gobwas/ws"
	gorilla "github.com/gorilla/websocket"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/internal/wstest"
)

// TestSubprotocolRelayed: the client offers "a, b", the backend knows only
// "b" and "c" and picks "b"; the client must see "b". Offers the backend
// does not share leave no subprotocol.
func TestSubprotocolRelayed(t *testing.T) {
	b := newBackend(t)
	s := startSluice(t, b.url, nil)
	cases := []struct {
		offer []string
		want  string
	}{
		{[]string{"a", "b"}, "b"},
		{[]string{"c", "b"}, "b"}, // the backend's preference wins
		{[]string{"a"}, ""},
		{nil, ""},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("gorilla offers %q", tc.offer), func(t *testing.T) {
			id := newID()
			d := gorilla.Dialer{HandshakeTimeout: wstest.IOTimeout, Subprotocols: tc.offer}
			c, resp, err := d.Dial(s.url+"/subproto?id="+id, nil)
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			if got := c.Subprotocol(); got != tc.want {
				t.Errorf("client negotiated %q, want %q", got, tc.want)
			}
			if got := resp.Header.Values("Sec-Websocket-Protocol"); tc.want == "" && len(got) != 0 {
				t.Errorf("101 carries Sec-WebSocket-Protocol %q, want none", got)
			}
			uc := b.waitConn(t, id)
			if uc.subprotocol != tc.want {
				t.Errorf("backend negotiated %q, want %q", uc.subprotocol, tc.want)
			}
			if err := gorillaEcho(c, gorilla.TextMessage, []byte("after negotiation")); err != nil {
				t.Error(err)
			}
		})
	}
	t.Run("coder offers a, b", func(t *testing.T) {
		c := dialCoder(t, s.url+"/subproto", &websocket.DialOptions{Subprotocols: []string{"a", "b"}})
		if got := c.Subprotocol(); got != "b" {
			t.Errorf("client negotiated %q, want \"b\"", got)
		}
	})
}

// countingConn counts the bytes a client's socket carries, to tell
// compressed traffic from plain.
type countingConn struct {
	net.Conn
	mu          sync.Mutex
	read, wrote int
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	c.read += n
	c.mu.Unlock()
	return n, err
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.mu.Lock()
	c.wrote += n
	c.mu.Unlock()
	return n, err
}

// TestPermessageDeflateEndToEnd: permessage-deflate negotiated between a
// gorilla client and a gorilla backend through sluice; compressed messages
// (RSV1 set) pass both ways, and the wire carries far fewer bytes than the
// messages hold.
func TestPermessageDeflateEndToEnd(t *testing.T) {
	b := newBackend(t)
	s := startSluice(t, b.url, nil)
	var cc *countingConn
	d := gorilla.Dialer{
		HandshakeTimeout:  wstest.IOTimeout,
		EnableCompression: true,
		NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var nd net.Dialer
			c, err := nd.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			cc = &countingConn{Conn: c}
			return cc, nil
		},
	}
	id := newID()
	c, resp, err := d.Dial(s.url+"/compress?id="+id, nil)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	if ext := resp.Header.Get("Sec-Websocket-Extensions"); !strings.Contains(ext, "permessage-deflate") {
		t.Fatalf("101 Sec-WebSocket-Extensions = %q, want permessage-deflate", ext)
	}
	uc := b.waitConn(t, id)
	if ext := uc.header.Get("Sec-Websocket-Extensions"); !strings.Contains(ext, "permessage-deflate") {
		t.Fatalf("backend was offered extensions %q, want permessage-deflate", ext)
	}

	cc.mu.Lock()
	read0, wrote0 := cc.read, cc.wrote
	cc.mu.Unlock()
	const rounds = 4
	msg := []byte(strings.Repeat("sluice compresses nothing, it only passes RSV1 on. ", 5000)) // 255 KB
	for i := range rounds {
		if err := gorillaEcho(c, gorilla.TextMessage, msg); err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		if err := gorillaEcho(c, gorilla.BinaryMessage, []byte(fmt.Sprintf("small %d", i))); err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
	}
	cc.mu.Lock()
	read, wrote := cc.read-read0, cc.wrote-wrote0
	cc.mu.Unlock()
	plain := rounds * len(msg)
	if read > plain/10 || wrote > plain/10 {
		t.Errorf("client socket carried %d bytes in and %d out for %d bytes of messages each way: not compressed end to end", read, wrote, plain)
	}
}

// TestHandshakeHeaders: the backend's Set-Cookie headers on its 101 reach
// the client; the client's end-to-end headers reach the backend with
// X-Forwarded-* set, and hop-by-hop headers (those named in Connection
// included) do not.
func TestHandshakeHeaders(t *testing.T) {
	b := newBackend(t)
	s := startSluice(t, b.url, nil)

	t.Run("Set-Cookie on 101", func(t *testing.T) {
		c, resp := dialGorilla(t, s.url+"/cookie", nil)
		want := []string{"session=s3cr3t; Path=/; HttpOnly", "theme=dark"}
		if got := resp.Header.Values("Set-Cookie"); !slices.Equal(got, want) {
			t.Errorf("Set-Cookie = %q, want %q", got, want)
		}
		if err := gorillaEcho(c, gorilla.TextMessage, []byte("x")); err != nil {
			t.Error(err)
		}
	})

	t.Run("request headers", func(t *testing.T) {
		c := wstest.Dial(t, s.addr, "/headers", []string{
			"Connection: Upgrade, X-Hop",
			"X-Hop: must-not-pass",
			"Keep-Alive: timeout=5",
			"Proxy-Authorization: Basic c2VjcmV0",
			"Cookie: session=abc; theme=dark",
			"Authorization: Bearer token-123",
			"Origin: https://app.example.test",
			"User-Agent: sluice-e2e/1.0",
			"X-Custom: custom value",
			"X-Forwarded-For: 203.0.113.7",
		}, nil)
		f := c.Read(t)
		if f.Op != ws.OpText {
			t.Fatalf("first message = %v, want the backend's JSON", f)
		}
		var got http.Header
		if err := json.Unmarshal(f.Payload, &got); err != nil {
			t.Fatalf("backend JSON: %v", err)
		}
		for name, want := range map[string]string{
			"Cookie":            "session=abc; theme=dark",
			"Authorization":     "Bearer token-123",
			"Origin":            "https://app.example.test",
			"User-Agent":        "sluice-e2e/1.0",
			"X-Custom":          "custom value",
			"X-Forwarded-For":   "203.0.113.7, 127.0.0.1",
			"X-Forwarded-Proto": "http",
			"X-Forwarded-Host":  s.addr,
		} {
			if v := got.Values(name); len(v) != 1 || v[0] != want {
				t.Errorf("backend got %s = %q, want %q", name, v, want)
			}
		}
		for _, name := range []string{"X-Hop", "Keep-Alive", "Proxy-Authorization"} {
			if v := got.Values(name); len(v) != 0 {
				t.Errorf("backend got hop-by-hop %s = %q, want it dropped", name, v)
			}
		}
		if v := got.Get("Connection"); strings.Contains(strings.ToLower(v), "x-hop") {
			t.Errorf("backend got Connection = %q, naming the client's hop-by-hop header", v)
		}
	})
}

// TestUpstreamRejectionRelayed: a backend that refuses the upgrade decides
// what the client sees: its status, its body and its headers.
func TestUpstreamRejectionRelayed(t *testing.T) {
	b := newBackend(t)
	s := startSluice(t, b.url, nil)
	for _, status := range []int{401, 403, 404, 429, 503} {
		t.Run(fmt.Sprint(status), func(t *testing.T) {
			d := gorilla.Dialer{HandshakeTimeout: wstest.IOTimeout}
			c, resp, err := d.Dial(fmt.Sprintf("%s/reject?status=%d", s.url, status), nil)
			if err == nil {
				c.Close()
				t.Fatal("upgrade succeeded, want a rejection")
			}
			if !errors.Is(err, gorilla.ErrBadHandshake) || resp == nil {
				t.Fatalf("dial error %v, want a bad handshake with a response", err)
			}
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != status {
				t.Errorf("status = %d, want %d", resp.StatusCode, status)
			}
			if string(body) != "go away" {
				t.Errorf("body = %q, want \"go away\"", body)
			}
			for name, want := range map[string][]string{
				"Www-Authenticate": {`Bearer realm="sluice-test"`},
				"Retry-After":      {"7"},
				"Set-Cookie":       {"rejected=1; Path=/", "tries=2; HttpOnly"},
				"Content-Type":     {"text/plain; charset=utf-8"},
				"X-Backend":        {"reject"},
			} {
				if got := resp.Header.Values(name); !slices.Equal(got, want) {
					t.Errorf("%s = %q, want %q", name, got, want)
				}
			}
		})
	}
}

// TestUpstreamUnavailable: an upstream that refuses connections earns a
// 502, one that accepts but never answers the upgrade a 504 once
// DialTimeout passes; both with a short body.
func TestUpstreamUnavailable(t *testing.T) {
	t.Run("refused", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dead := ln.Addr().String()
		ln.Close()
		s := startSluice(t, "ws://"+dead, nil)
		status, body := rejectedDial(t, s.url+"/echo")
		if status != http.StatusBadGateway {
			t.Errorf("status = %d, want 502", status)
		}
		checkShortBody(t, body)
	})
	t.Run("blackholed", func(t *testing.T) {
		hole := blackhole(t)
		s := startSluiceEnv(t, "ws://"+hole, map[string]string{config.Prefix + "UPSTREAM_DIAL_TIMEOUT": "300ms"}, nil)
		began := time.Now()
		status, body := rejectedDial(t, s.url+"/echo")
		took := time.Since(began)
		if status != http.StatusGatewayTimeout {
			t.Errorf("status = %d, want 504", status)
		}
		if took < 250*time.Millisecond || took > 2*time.Second {
			t.Errorf("answered after %v, want about the 300ms DialTimeout", took)
		}
		checkShortBody(t, body)
	})
}

func rejectedDial(t *testing.T, u string) (int, []byte) {
	t.Helper()
	d := gorilla.Dialer{HandshakeTimeout: wstest.IOTimeout}
	c, resp, err := d.Dial(u, nil)
	if err == nil {
		c.Close()
		t.Fatal("upgrade succeeded, want a rejection")
	}
	if resp == nil {
		t.Fatalf("dial error %v with no HTTP response", err)
	}
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, body
}

func checkShortBody(t *testing.T, body []byte) {
	t.Helper()
	if len(body) == 0 || len(body) > 256 {
		t.Errorf("body = %q, want a short explanation", body)
	}
}

// blackhole listens and accepts connections but never answers them. The
// cleanup closes it and every connection it accepted.
func blackhole(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	return ln.Addr().String()
}

// TestPlainHTTPGetRefused: with SLUICE_HTTP_PASSTHROUGH=false, a GET
// without Upgrade gets 426 Upgrade Required naming websocket.
func TestPlainHTTPGetRefused(t *testing.T) {
	b := newBackend(t)
	s := startSluiceEnv(t, b.url, map[string]string{config.Prefix + "HTTP_PASSTHROUGH": "false"}, nil)
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	client := http.Client{Transport: tr, Timeout: wstest.IOTimeout}
	resp, err := client.Get("http://" + s.addr + "/echo")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Errorf("status = %d, want 426", resp.StatusCode)
	}
	if got := resp.Header.Get("Upgrade"); !strings.EqualFold(got, "websocket") {
		t.Errorf("Upgrade = %q, want websocket", got)
	}
	checkShortBody(t, body)
}
