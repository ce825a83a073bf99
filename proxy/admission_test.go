package proxy

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/rs/zerolog"
	"go.uber.org/goleak"

	"github.com/sluice-proxy/sluice/internal/wstest"
)

// --- token bucket -------------------------------------------------------

// --- rate-limited rejection log -----------------------------------------

// --- trusted proxies and the client address --------------------------------

// --- origins ------------------------------------------------------------

// --- the frame watch -----------------------------------------------------

// TestFrameWatch drives the frame watch's clock and timer as the client's
// reader and the timer callback do, in a synctest bubble.
func TestFrameWatch(t *testing.T) {
	const timeout = 30 * time.Second
	type step struct {
		do  string // begin, end, hold, release, or a duration to sleep
		dur time.Duration
	}
	sleep := func(d time.Duration) step { return step{"sleep", d} }
	begin, end := step{do: "begin"}, step{do: "end"}
	hold, release := step{do: "hold"}, step{do: "release"}
	tests := []struct {
		name  string
		steps []step
		want  []time.Duration // when the frame was found overdue
	}{
		{"idle forever", []step{sleep(time.Hour)}, nil},
		{"a frame in time", []step{begin, sleep(29 * time.Second), end, sleep(time.Hour)}, nil},
		{"a stalled frame", []step{begin, sleep(time.Hour)}, []time.Duration{timeout}},
		{"stall after many frames", func() []step {
			var s []step
			for range 100 {
				s = append(s, begin, sleep(time.Second), end)
			}
			return append(s, begin, sleep(time.Hour))
		}(), []time.Duration{100*time.Second + timeout}},
		{"idle, then a stalled frame", []step{sleep(10 * time.Minute), begin, sleep(time.Hour)}, []time.Duration{10*time.Minute + timeout}},
		{"next frame already buffered", []step{begin, sleep(10 * time.Second), end, begin, sleep(time.Hour)}, []time.Duration{10*time.Second + timeout}},
		{"held back by the upstream", []step{begin, hold, sleep(100 * time.Second), release, sleep(time.Hour)}, []time.Duration{120 * time.Second}},
		{"held back, then the frame ends", []step{begin, hold, sleep(100 * time.Second), release, sleep(10 * time.Second), end, sleep(time.Hour)}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				began := time.Now()
				var w frameWatch
				var held atomic.Bool
				overdue := make(chan time.Duration, 10)
				// As watchFrom and frameTimerFired do.
				w.timer.Store(time.AfterFunc(math.MaxInt64, func() {
					if w.check(time.Since(began), timeout, held.Load()) {
						overdue <- time.Since(began)
					}
				}))
				for _, st := range tt.steps {
					switch st.do {
					case "begin":
						if w.begin(time.Since(began)) {
							w.timer.Load().Reset(timeout)
						}
					case "end":
						w.end()
					case "hold":
						held.Store(true)
					case "release":
						held.Store(false)
					case "sleep":
						time.Sleep(st.dur)
					}
				}
				synctest.Wait()
				w.stop()
				close(overdue)
				var got []time.Duration
				for d := range overdue {
					got = append(got, d)
				}
				if fmt.Sprint(got) != fmt.Sprint(tt.want) {
					t.Errorf("overdue at %v, want %v", got, tt.want)
				}
			})
		})
	}
}

// --- end to end -------------------------------------------------------------

// checkLeaks fails t if goroutines started during it outlive it (sessions,
// timers, backend handlers). Call it first, so that it runs after every
// other cleanup.
func checkLeaks(t *testing.T) {
	opt := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, opt) })
}

// echoBackend is the shared gobwas/ws echo server that also records, for
// each connection by its X-Test-Id header, the X-Forwarded-For that
// sluice sent and how the connection ended.
type echoBackend struct {
	*wstest.RawBackend

	mu    sync.Mutex
	xff   map[string]string // by X-Test-Id; guarded by mu
	ends  map[string]string // by X-Test-Id: "close 1001", "cut"; guarded by mu
	ended chan struct{}     // pinged on each end
}

func newEchoBackend(t *testing.T) *echoBackend {
	b := &echoBackend{xff: map[string]string{}, ends: map[string]string{}, ended: make(chan struct{}, 100)}
	b.RawBackend = wstest.ServeRaw(t, wstest.RawOptions{BeforeUpgrade: func(h http.Header) {
		// Before the 101, so that the test sees it once its client is in.
		b.mu.Lock()
		b.xff[h.Get("X-Test-Id")] = h.Get("X-Forwarded-For")
		b.mu.Unlock()
	}}, func(c *wstest.RawConn) {
		err := wstest.Echo(c)
		end := "cut"
		var ce wsutil.ClosedError
		if errors.As(err, &ce) {
			end = fmt.Sprintf("close %d", ce.Code)
		}
		b.mu.Lock()
		b.ends[c.Header.Get("X-Test-Id")] = end
		b.mu.Unlock()
		b.ended <- struct{}{}
	})
	return b
}

// waitEnd returns how the backend connection of client id ended.
func (b *echoBackend) waitEnd(t *testing.T, id string) string {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		b.mu.Lock()
		end, ok := b.ends[id]
		b.mu.Unlock()
		if ok {
			return end
		}
		select {
		case <-b.ended:
		case <-deadline:
			t.Fatalf("backend connection of %s did not end", id)
		}
	}
}

func (b *echoBackend) xffOf(id string) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.xff[id]
}

type testProxy struct {
	*Server
	addr string
	logs *wstest.LogBuffer
}

func startTestProxy(t *testing.T, b *echoBackend, opts Options) *testProxy {
	t.Helper()
	opts.Upstream = &url.URL{Scheme: "ws", Host: b.Addr, Path: "/"}
	logs := &wstest.LogBuffer{}
	opts.Logger = zerolog.New(logs)
	opts.Registerer = prometheus.NewRegistry()
	srv, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	addr, served := serveLoopback(t, srv)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		<-served
	})
	return &testProxy{Server: srv, addr: addr, logs: logs}
}

func (p *testProxy) rejected(reason string) float64 {
	return counterValue(p.metrics.rejected.WithLabelValues(reason))
}

func (p *testProxy) evicted(reason string) float64 {
	return counterValue(p.metrics.evictions.WithLabelValues(reason))
}

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	c.Write(&m)
	return m.GetCounter().GetValue()
}

// wsClient is a raw client connection after its upgrade.
type wsClient struct {
	net.Conn
	br *bufio.Reader
}

// upgrade sends an upgrade request to p from the local IP (127.0.0.1 when
// empty) with header lines kv (name, value, ...). For a 101 it returns the
// connection, closed when the test ends; otherwise the response with its
// body read into body.
func upgrade(t *testing.T, p *testProxy, local string, kv ...string) (res *http.Response, body string, c *wsClient) {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if local != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(local)}
	}
	conn, err := d.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	var key [16]byte
	rand.Read(key[:])
	var req strings.Builder
	fmt.Fprintf(&req, "GET / HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n", p.addr, base64.StdEncoding.EncodeToString(key[:]))
	for i := 0; i+1 < len(kv); i += 2 {
		fmt.Fprintf(&req, "%s: %s\r\n", kv[i], kv[i+1])
	}
	req.WriteString("\r\n")
	if _, err := io.WriteString(conn, req.String()); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	res, err = http.ReadResponse(br, nil)
	if err != nil {
		conn.Close()
		t.Fatal(err)
	}
	if res.StatusCode != http.StatusSwitchingProtocols {
		b, _ := io.ReadAll(res.Body)
		conn.Close()
		return res, string(b), nil
	}
	conn.SetDeadline(time.Time{})
	c = &wsClient{Conn: conn, br: br}
	t.Cleanup(func() { conn.Close() })
	return res, "", c
}

// mustUpgrade wants a 101.
func mustUpgrade(t *testing.T, p *testProxy, local string, kv ...string) *wsClient {
	t.Helper()
	res, body, c := upgrade(t, p, local, kv...)
	if c == nil {
		t.Fatalf("upgrade: %s %q, want 101", res.Status, body)
	}
	return c
}

// wantRefused wants status, a Retry-After of 1 to 5 seconds when retry,
// Connection: close, and a body containing msg.
func wantRefused(t *testing.T, p *testProxy, status int, retry bool, msg, local string, kv ...string) {
	t.Helper()
	res, body, c := upgrade(t, p, local, kv...)
	if c != nil {
		t.Fatalf("upgrade succeeded, want %d", status)
	}
	if res.StatusCode != status {
		t.Errorf("status %s, want %d", res.Status, status)
	}
	ra := res.Header.Get("Retry-After")
	if n, err := strconv.Atoi(ra); retry && (err != nil || n < 1 || n > 5) {
		t.Errorf("Retry-After %q, want 1 to 5", ra)
	} else if !retry && ra != "" {
		t.Errorf("Retry-After %q, want none", ra)
	}
	if !res.Close {
		t.Errorf("no Connection: close")
	}
	if !strings.Contains(body, msg) {
		t.Errorf("body %q, want it to contain %q", body, msg)
	}
}

func (c *wsClient) readFrame(t *testing.T) (ws.Header, []byte) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	h, err := ws.ReadHeader(c.br)
	if err != nil {
		t.Fatalf("read frame: %v", err)
	}
	p := make([]byte, h.Length)
	if _, err := io.ReadFull(c.br, p); err != nil {
		t.Fatalf("read payload: %v", err)
	}
	return h, p
}

// echo sends msg and wants it back.
func (c *wsClient) echo(t *testing.T, msg string) {
	t.Helper()
	if err := ws.WriteFrame(c, ws.MaskFrame(ws.NewTextFrame([]byte(msg)))); err != nil {
		t.Fatal(err)
	}
	if h, p := c.readFrame(t); h.OpCode != ws.OpText || string(p) != msg {
		t.Fatalf("echo: got %v %q, want text %q", h.OpCode, p, msg)
	}
}

// readClose wants a close frame and returns its code.
func (c *wsClient) readClose(t *testing.T) ws.StatusCode {
	t.Helper()
	h, p := c.readFrame(t)
	if h.OpCode != ws.OpClose || len(p) < 2 {
		t.Fatalf("got %v %q, want a close frame", h.OpCode, p)
	}
	return ws.StatusCode(binary.BigEndian.Uint16(p))
}

// bye closes the connection as a client going away.
func (c *wsClient) bye() { c.Close() }

func TestAdmissionEndToEnd(t *testing.T) {
	checkLeaks(t)

	t.Run("max connections", func(t *testing.T) {
		b := newEchoBackend(t)
		p := startTestProxy(t, b, Options{MaxConnections: 2})
		c1 := mustUpgrade(t, p, "")
		c2 := mustUpgrade(t, p, "")
		wantRefused(t, p, http.StatusServiceUnavailable, true, "connection limit", "")
		for range 20 {
			upgrade(t, p, "")
		}
		if n := b.Accepts.Load(); n != 2 {
			t.Errorf("backend accepted %d connections, want 2", n)
		}
		if n := p.rejected("max_connections"); n != 21 {
			t.Errorf("rejected{max_connections} = %v, want 21", n)
		}
		// A burst is one line (two if it straddled a second), not 21.
		if n := p.logs.Count(`"reason":"max_connections"`, "upgrades rejected"); n < 1 || n > 2 {
			t.Errorf("%d log lines for 21 refusals:\n%s", n, p.logs.String())
		}
		c2.echo(t, "still here")
		waitSessions(t, p.Server, 2) // a client sees its 101 just before its session registers
		c1.bye()
		waitSessions(t, p.Server, 1)
		mustUpgrade(t, p, "").echo(t, "a freed slot")
	})

	t.Run("slot freed when the upstream refuses", func(t *testing.T) {
		b := newEchoBackend(t)
		p := startTestProxy(t, b, Options{MaxConnections: 1, MaxConnectionsPerIP: 1})
		b.CloseListener()
		for range 3 {
			res, _, c := upgrade(t, p, "")
			if c != nil || res.StatusCode != http.StatusBadGateway {
				t.Fatalf("status %s, want 502 each time", res.Status)
			}
		}
	})

	t.Run("per IP", func(t *testing.T) {
		b := newEchoBackend(t)
		p := startTestProxy(t, b, Options{MaxConnectionsPerIP: 1})
		c1 := mustUpgrade(t, p, "127.0.0.1")
		wantRefused(t, p, http.StatusTooManyRequests, true, "too many connections", "127.0.0.1")
		c2 := mustUpgrade(t, p, "127.0.0.2")
		if n := b.Accepts.Load(); n != 2 {
			t.Errorf("backend accepted %d connections, want 2", n)
		}
		if n := p.rejected("max_connections_per_ip"); n != 1 {
			t.Errorf("rejected{max_connections_per_ip} = %v, want 1", n)
		}
		waitSessions(t, p.Server, 2)
		c1.bye()
		waitSessions(t, p.Server, 1)
		mustUpgrade(t, p, "127.0.0.1").echo(t, "again")
		c2.echo(t, "neighbour")
	})

	t.Run("per IP behind a trusted proxy", func(t *testing.T) {
		b := newEchoBackend(t)
		p := startTestProxy(t, b, Options{
			MaxConnectionsPerIP: 1,
			TrustedProxies:      []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")},
		})
		mustUpgrade(t, p, "127.0.0.1", "X-Test-Id", "a", "X-Forwarded-For", "6.6.6.6, 198.51.100.7")
		if got := b.xffOf("a"); got != "6.6.6.6, 198.51.100.7" {
			t.Errorf("upstream X-Forwarded-For %q", got)
		}
		waitSessions(t, p.Server, 1)
		if snap := p.Snapshot(); len(snap) != 1 || snap[0].Client != "198.51.100.7" {
			t.Errorf("status shows %+v, want client 198.51.100.7", snap)
		}
		wantRefused(t, p, http.StatusTooManyRequests, true, "too many", "127.0.0.1", "X-Forwarded-For", "198.51.100.7")
		mustUpgrade(t, p, "127.0.0.1", "X-Test-Id", "b", "X-Forwarded-For", "198.51.100.8")
		if got := b.xffOf("b"); got != "198.51.100.8" {
			t.Errorf("upstream X-Forwarded-For %q", got)
		}
		// An untrusted peer cannot claim to be someone else: it is
		// counted as itself, and its claim is passed on before it.
		mustUpgrade(t, p, "127.0.0.2", "X-Test-Id", "c", "X-Forwarded-For", "198.51.100.7")
		if got := b.xffOf("c"); got != "198.51.100.7, 127.0.0.2" {
			t.Errorf("upstream X-Forwarded-For %q", got)
		}
		wantRefused(t, p, http.StatusTooManyRequests, true, "too many", "127.0.0.2", "X-Forwarded-For", "198.51.100.99")
	})

	t.Run("origin", func(t *testing.T) {
		b := newEchoBackend(t)
		p := startTestProxy(t, b, Options{AllowedOrigins: []string{"https://app.example.com", "https://*.example.com"}})
		for _, kv := range [][]string{
			{"Origin", "https://evil.com"},
			{"Origin", "https://example.com.evil.com"},
			{"Origin", "http://a.example.com"},
			{"Origin", "null"},
			{"Origin", "https://a.example.com", "Origin", "https://b.example.com"},
		} {
			wantRefused(t, p, http.StatusForbidden, false, "origin not allowed", "", kv...)
		}
		if n := b.Accepts.Load(); n != 0 {
			t.Errorf("backend dialled %d times for refused origins", n)
		}
		mustUpgrade(t, p, "", "Origin", "https://a.b.example.com").echo(t, "subdomain")
		mustUpgrade(t, p, "", "Origin", "https://app.example.com").echo(t, "exact")
		mustUpgrade(t, p, "").echo(t, "no origin: not a browser")
		if n := p.rejected("origin"); n != 5 {
			t.Errorf("rejected{origin} = %v, want 5", n)
		}
		if n := p.logs.Count(`"reason":"origin"`, `"origin":"https://evil.com"`); n != 1 {
			t.Errorf("want one log line naming the first refused origin:\n%s", p.logs.String())
		}
	})

	t.Run("handshake rate", func(t *testing.T) {
		b := newEchoBackend(t)
		p := startTestProxy(t, b, Options{MaxHandshakesPerSecond: 1})
		began := time.Now()
		ok := 0
		for range 5 {
			if res, _, c := upgrade(t, p, ""); c != nil {
				ok++
			} else if res.StatusCode != http.StatusServiceUnavailable {
				t.Fatalf("status %s, want 101 or 503", res.Status)
			}
		}
		// One token at once, then one a second.
		if limit := 1 + int(time.Since(began)/time.Second); ok < 1 || ok > limit {
			t.Errorf("%d of 5 upgrades in %v got through, want 1 to %d", ok, time.Since(began), limit)
		}
		if ok == 5 {
			t.Skip("too slow a machine to see the limit")
		}
		wantRefused(t, p, http.StatusServiceUnavailable, true, "too many new connections", "")
		if n := b.Accepts.Load(); int(n) != ok {
			t.Errorf("backend accepted %d, want %d", n, ok)
		}
		if n := p.rejected("rate_limit"); int(n) != 5-ok+1 {
			t.Errorf("rejected{rate_limit} = %v, want %d", n, 5-ok+1)
		}
	})
}

func TestFrameReadTimeout(t *testing.T) {
	checkLeaks(t)
	const timeout = 300 * time.Millisecond
	b := newEchoBackend(t)
	p := startTestProxy(t, b, Options{FrameReadTimeout: timeout})

	neighbour := mustUpgrade(t, p, "", "X-Test-Id", "neighbour")
	idle := mustUpgrade(t, p, "", "X-Test-Id", "idle")
	inline := mustUpgrade(t, p, "", "X-Test-Id", "inline")
	streamed := mustUpgrade(t, p, "", "X-Test-Id", "streamed")
	slow := mustUpgrade(t, p, "", "X-Test-Id", "slow")
	neighbour.echo(t, "hello")

	// Half a small frame: it is read into sluice, never forwarded.
	writeHalf := func(c *wsClient, length int64, send int) {
		t.Helper()
		if err := ws.WriteHeader(c, ws.Header{Fin: true, OpCode: ws.OpBinary, Masked: true, Mask: ws.NewMask(), Length: length}); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write(make([]byte, send)); err != nil {
			t.Fatal(err)
		}
	}
	began := time.Now()
	writeHalf(inline, 100, 10)
	// Half a large frame: its start is already spliced to the backend.
	writeHalf(streamed, 1<<20, 200<<10)
	// A frame that takes a while but arrives in time.
	writeHalf(slow, 2*1024, 1024)
	time.Sleep(timeout / 3)
	if _, err := slow.Write(make([]byte, 1024)); err != nil {
		t.Fatal(err)
	}
	if h, p := slow.readFrame(t); h.OpCode != ws.OpBinary || len(p) != 2048 {
		t.Errorf("slow frame: got %v, %d bytes", h.OpCode, len(p))
	}
	for i := range 5 {
		neighbour.echo(t, fmt.Sprint("during ", i))
		time.Sleep(timeout / 5)
	}

	for _, c := range []*wsClient{inline, streamed} {
		if code := c.readClose(t); code != 1013 {
			t.Errorf("stalled client got close %d, want 1013", code)
		}
	}
	if d := time.Since(began); d < timeout {
		t.Errorf("evicted after %v, before the %v timeout", d, timeout)
	}
	if end := b.waitEnd(t, "inline"); end != "close 1001" {
		t.Errorf("backend leg of the inline stall: %s, want close 1001", end)
	}
	// Its frame is torn: no close frame can follow it there.
	if end := b.waitEnd(t, "streamed"); end != "cut" {
		t.Errorf("backend leg of the streamed stall: %s, want cut", end)
	}
	if n := p.evicted(endings[causeReadTimeout].label); n != 2 {
		t.Errorf("evictions{read_timeout} = %v, want 2", n)
	}
	if n := p.logs.Count(`"reason":"read_timeout"`, "client evicted"); n != 2 {
		t.Errorf("%d eviction lines, want 2", n)
	}
	// Idle clients are not the frame watch's business.
	time.Sleep(2 * timeout)
	idle.echo(t, "idle is fine")
	slow.echo(t, "slow is fine")
	neighbour.echo(t, "after")
	waitSessions(t, p.Server, 3)
}
