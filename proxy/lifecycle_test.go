package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"runtime/metrics"
	"sync"
	"syscall"
	"testing"
	"time"

	cws "github.com/coder/websocket"
	"github.com/gobwas/ws"
	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/internal/sockopt"
	"github.com/sluice-proxy/sluice/internal/wstest"
	"github.com/sluice-proxy/sluice/limiter"
)

// --- lifecycle helpers ------------------------------------------------------

// lifecycleProxy is a sluice Server on a loopback listener, with its own
// registry. shutdown may be called by the test; cleanup calls it once more
// only if the test did not.
type lifecycleProxy struct {
	*Server
	addr     string
	reg      *prometheus.Registry
	shutdown func(ctx context.Context) error
}

func startLifecycleProxy(t *testing.T, upstream string, opts Options) *lifecycleProxy {
	t.Helper()
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	u.Scheme = "ws"
	opts.Upstream = u
	opts.Logger = zerolog.Nop()
	reg := prometheus.NewRegistry()
	opts.Registerer = reg
	srv, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	addr, served := serveLoopback(t, srv)
	var once sync.Once
	var shutErr error
	shutdown := func(ctx context.Context) error {
		once.Do(func() { shutErr = srv.Shutdown(ctx) })
		return shutErr
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		shutdown(ctx)
		<-served
	})
	return &lifecycleProxy{Server: srv, addr: addr, reg: reg, shutdown: shutdown}
}

// metricValue is the sum of the series name whose labels include the
// given pairs (wstest.Metric); a series not (yet) there reads 0.
func metricValue(t *testing.T, reg prometheus.Gatherer, name string, labels ...string) float64 {
	t.Helper()
	v, _ := wstest.Metric(t, reg, name, labels...)
	return v
}

// waitMetric polls a series until it reads want; metrics are updated by
// session goroutines that have no signal for the test to wait on.
func waitMetric(t *testing.T, reg prometheus.Gatherer, want float64, name string, labels ...string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := metricValue(t, reg, name, labels...)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s%v = %v, want %v", name, labels, got, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// gorillaBackend is a gorilla/websocket server on 127.0.0.1. Path /echo
// echoes every message; /flood writes 1 KiB messages until a write fails
// and reports, on floodClose, the close code sluice sent it.
type gorillaBackend struct {
	*httptest.Server
	floodClose chan int
}

func newGorillaBackend(t *testing.T) *gorillaBackend {
	b := &gorillaBackend{floodClose: make(chan int, 4)}
	up := websocket.Upgrader{}
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer c.Close()
		switch r.URL.Path {
		case "/flood":
			b.flood(c)
		default:
			for {
				c.SetReadDeadline(time.Now().Add(20 * time.Second))
				mt, p, err := c.ReadMessage()
				if err != nil {
					return
				}
				c.SetWriteDeadline(time.Now().Add(10 * time.Second))
				if err := c.WriteMessage(mt, p); err != nil {
					return
				}
			}
		}
	}))
	t.Cleanup(b.Close)
	return b
}

func (b *gorillaBackend) flood(c *websocket.Conn) {
	done := make(chan struct{})
	go func() { // floodReader: hears sluice's close
		defer close(done)
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		for {
			if _, _, err := c.ReadMessage(); err != nil {
				code := -1
				var ce *websocket.CloseError
				if errors.As(err, &ce) {
					code = ce.Code
				}
				b.floodClose <- code
				return
			}
		}
	}()
	msg := make([]byte, 1024)
	for {
		c.SetWriteDeadline(time.Now().Add(10 * time.Second))
		if err := c.WriteMessage(websocket.BinaryMessage, msg); err != nil {
			break
		}
		select {
		case <-done:
			return
		default:
		}
	}
	<-done
}

// readCloseCode reads frames from a raw backend connection until a close
// frame and returns its code; sluice's frames to the upstream are masked.
func readCloseCode(c net.Conn) (ws.StatusCode, error) {
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		f, err := wstest.ReadFrameMax(c, 1<<20)
		if err != nil {
			return 0, err
		}
		if f.Op == ws.OpClose {
			code, _ := ws.ParseCloseFrameData(f.Payload)
			return code, nil
		}
	}
}

// --- tests ------------------------------------------------------------------

func TestMetricsAcrossASession(t *testing.T) {
	checkLeaks(t)
	b := newGorillaBackend(t)
	p := startLifecycleProxy(t, b.URL, Options{
		WriteTimeout:      5 * time.Second,
		CloseTimeout:      3 * time.Second,
		ClientWriteBuffer: 16 << 10,
		Queue:             limiter.Config{Policy: limiter.Evict, MaxMessages: 10},
	})
	reg := p.reg

	// One client, echoed.
	c1, _, err := websocket.DefaultDialer.Dial("ws://"+p.addr+"/echo", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	waitMetric(t, reg, 1, "sluice_connections_active")
	waitMetric(t, reg, 1, "sluice_connections_accepted_total")
	waitMetric(t, reg, 1, "sluice_handshake_duration_seconds")

	for i := range 3 {
		msg := []byte{'m', byte('0' + i)}
		c1.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if err := c1.WriteMessage(websocket.TextMessage, msg); err != nil {
			t.Fatal(err)
		}
		c1.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, got, err := c1.ReadMessage()
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != string(msg) {
			t.Fatalf("echo %q, want %q", got, msg)
		}
	}
	waitMetric(t, reg, 3, "sluice_messages_total", "direction", "client_to_upstream")
	waitMetric(t, reg, 3, "sluice_messages_total", "direction", "upstream_to_client")
	for _, d := range []string{"client_to_upstream", "upstream_to_client"} {
		if v := metricValue(t, reg, "sluice_bytes_total", "direction", d); v <= 0 {
			t.Errorf("sluice_bytes_total{direction=%q} = %v, want > 0", d, v)
		}
	}

	// A second client stops reading while the backend floods it: a small
	// receive window, so sluice's queue for it fills and it is evicted.
	d := websocket.Dialer{
		HandshakeTimeout: 5 * time.Second,
		NetDial: func(network, addr string) (net.Conn, error) {
			nd := net.Dialer{Control: wstest.SmallWindow(4096)}
			return nd.Dial(network, addr)
		},
	}
	c2, _, err := d.Dial("ws://"+p.addr+"/flood", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	waitMetric(t, reg, 1, "sluice_evictions_total", "reason", "slow")
	if ev := p.RecentEvictions(); len(ev) != 1 || ev[0].Reason != endings[causeSlow].label {
		t.Errorf("RecentEvictions = %+v, want one %q", ev, endings[causeSlow].label)
	}
	// Now read: the writer's blocked batch completes, then the 1013 that
	// overtook the rest of the queue.
	c2.SetReadDeadline(time.Now().Add(10 * time.Second))
	code := -1
	for {
		if _, _, err := c2.ReadMessage(); err != nil {
			var ce *websocket.CloseError
			if errors.As(err, &ce) {
				code = ce.Code
			} else {
				t.Errorf("evicted client: %v, want a close frame", err)
			}
			break
		}
	}
	if code != -1 && code != 1013 {
		t.Errorf("evicted client got close %d, want 1013", code)
	}
	select {
	case code := <-b.floodClose:
		if code != 1001 {
			t.Errorf("flooding backend got close %d, want 1001", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("flooding backend never heard its close")
	}
	waitMetric(t, reg, 1, "sluice_close_codes_total", "leg", "client", "direction", "sent", "code", "1013")
	waitMetric(t, reg, 1, "sluice_close_codes_total", "leg", "upstream", "direction", "sent", "code", "1001")
	c2.Close()

	// The first client closes normally.
	c1.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if err := c1.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(1000, "bye"), time.Now().Add(5*time.Second)); err != nil {
		t.Fatal(err)
	}
	c1.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, _, err = c1.ReadMessage()
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != 1000 {
		t.Errorf("first client: %v, want close 1000 echoed", err)
	}
	waitMetric(t, reg, 1, "sluice_close_codes_total", "leg", "client", "direction", "received", "code", "1000")
	waitMetric(t, reg, 0, "sluice_connections_active")
	waitMetric(t, reg, 2, "sluice_connections_accepted_total")
}

func TestDrainSpread(t *testing.T) {
	checkLeaks(t)
	b := newGorillaBackend(t)
	p := startLifecycleProxy(t, b.URL, Options{DrainSpread: 900 * time.Millisecond})

	const n = 10
	type arrival struct {
		at   time.Time
		code int
		err  error
	}
	arrivals := make(chan arrival, n)
	conns := make([]*websocket.Conn, n)
	for i := range conns {
		c, _, err := websocket.DefaultDialer.Dial("ws://"+p.addr+"/echo", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns[i] = c
	}
	waitSessions(t, p.Server, n)
	for _, c := range conns {
		go func() { // drainReader
			c.SetReadDeadline(time.Now().Add(15 * time.Second))
			for {
				_, _, err := c.ReadMessage()
				if err == nil {
					continue
				}
				a := arrival{at: time.Now(), code: -1, err: err}
				var ce *websocket.CloseError
				if errors.As(err, &ce) {
					a.code = ce.Code
				}
				arrivals <- a
				return
			}
		}()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.shutdown(ctx); err != nil {
		t.Errorf("Shutdown = %v, want nil", err)
	}
	var first, last time.Time
	for range n {
		a := <-arrivals // each reader ends by its read deadline at worst
		if a.code != 1001 {
			t.Errorf("client got %v, want close 1001", a.err)
			continue
		}
		if first.IsZero() || a.at.Before(first) {
			first = a.at
		}
		if a.at.After(last) {
			last = a.at
		}
	}
	if spread := last.Sub(first); spread < 600*time.Millisecond {
		t.Errorf("1001s arrived over %v, want them spread over ~900ms (at least 600ms)", spread)
	}
}

// upstreamFailure runs a raw backend that sends bad bytes after its
// upgrade and checks that the client gets 1014 and the backend 1002.
func upstreamFailure(t *testing.T, bad []byte) {
	checkLeaks(t)
	backendCode := make(chan ws.StatusCode, 1)
	up := wstest.ServeRaw(t, wstest.RawOptions{}, func(c *wstest.RawConn) {
		c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(bad); err != nil {
			t.Errorf("backend write: %v", err)
		}
		code, err := readCloseCode(c)
		if err != nil {
			t.Errorf("backend read: %v", err)
		}
		backendCode <- code
	}).URL
	p := startLifecycleProxy(t, up, Options{CloseTimeout: 2 * time.Second})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, _, err := cws.Dial(ctx, "ws://"+p.addr+"/", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	_, _, err = c.Read(ctx)
	if got := cws.CloseStatus(err); got != 1014 {
		t.Errorf("client: %v (status %d), want close 1014", err, got)
	}
	select {
	case code := <-backendCode:
		if code != ws.StatusProtocolError {
			t.Errorf("backend got close %d, want 1002", code)
		}
	case <-ctx.Done():
		t.Fatal("backend never heard its close")
	}
	waitMetric(t, p.reg, 1, "sluice_protocol_errors_total", "leg", "upstream", "code", "1002")
}

func TestUpstreamMaskedFrame(t *testing.T) {
	bad, err := ws.CompileFrame(ws.MaskFrame(ws.NewTextFrame([]byte("masked by a server"))))
	if err != nil {
		t.Fatal(err)
	}
	upstreamFailure(t, bad)
}

func TestUpstreamGarbage(t *testing.T) {
	// FIN, reserved opcode 0x3, no payload.
	upstreamFailure(t, []byte{0x83, 0x00})
}

func heapBytes() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

func TestUpstreamStopsReading(t *testing.T) {
	checkLeaks(t)
	release := make(chan struct{})
	up := wstest.ServeRaw(t, wstest.RawOptions{}, func(c *wstest.RawConn) {
		sockopt.SetConnBuffer(c, syscall.SO_RCVBUF, 4096)
		<-release // never reads
	}).URL
	t.Cleanup(func() { close(release) }) // runs before rawBackend's cleanup
	p := startLifecycleProxy(t, up, Options{UpstreamWriteTimeout: 500 * time.Millisecond, CloseTimeout: 2 * time.Second})

	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, _, err := cws.Dial(ctx, "ws://"+p.addr+"/", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()

	heap0 := heapBytes()
	began := time.Now()
	const maxWrites = 40
	written := make(chan int, 1)
	go func() { // clientFlood
		msg := make([]byte, 1<<20)
		n := 0
		for ; n < maxWrites; n++ {
			if err := c.Write(ctx, cws.MessageBinary, msg); err != nil {
				break
			}
		}
		written <- n
	}()
	_, _, err = c.Read(ctx)
	elapsed := time.Since(began)
	heapGrowth := int64(heapBytes()) - int64(heap0)
	if got := cws.CloseStatus(err); got != 1014 {
		t.Errorf("client: %v (status %d), want close 1014", err, got)
	}
	if elapsed > 5*time.Second {
		t.Errorf("close came %v after the first write, want within a few seconds of the 500ms write timeout", elapsed)
	}
	c.CloseNow() // unblocks a write still waiting on the socket
	n := <-written
	if n >= maxWrites {
		t.Errorf("client wrote all %d MiB without blocking: sluice kept reading a client whose upstream does not read", n)
	}
	if heapGrowth > 64<<20 {
		t.Errorf("heap grew by %d MiB while the upstream did not read", heapGrowth>>20)
	}
	t.Logf("client wrote %d MiB before blocking; close after %v; heap growth %d KiB", n, elapsed, heapGrowth>>10)
	waitMetric(t, p.reg, 0, "sluice_connections_active")
}

// TestRefusedMessageNotTorn: while the session is ending (the client has
// sent its close), a message whose first frame finds the client's queue
// full is refused whole; its later frames must not reach the client as
// continuations without a start.
func TestRefusedMessageNotTorn(t *testing.T) {
	checkLeaks(t)
	sent, done := make(chan struct{}), make(chan struct{})
	backend := wstest.ServeRaw(t, wstest.RawOptions{}, func(c *wstest.RawConn) {
		// Wait for the client's close (forwarded by sluice), ignore it, and
		// send 400 messages of three frames: far more than the client's
		// socket, sluice's small send buffer and a queue of two hold.
		if _, err := readCloseCode(c); err != nil {
			return
		}
		go io.Copy(io.Discard, c)
		part := make([]byte, 512)
		for i := 0; i < 400; i++ {
			for j, op := range []ws.OpCode{ws.OpText, ws.OpContinuation, ws.OpContinuation} {
				h := ws.Header{Fin: j == 2, OpCode: op, Length: int64(len(part))}
				if err := ws.WriteHeader(c, h); err != nil {
					return
				}
				if _, err := c.Write(part); err != nil {
					return
				}
			}
		}
		close(sent)
		<-done // hold the upstream open: the session ends by sluice's close timeout
	}).URL
	t.Cleanup(func() { close(done) }) // runs before rawBackend's cleanup
	p := startLifecycleProxy(t, backend, Options{
		Queue:             limiter.Config{Policy: limiter.Evict, MaxMessages: 2},
		CloseTimeout:      3 * time.Second,
		ClientWriteBuffer: 4096,
	})
	d := ws.Dialer{NetDial: (&net.Dialer{Control: wstest.SmallWindow(4096)}).DialContext}
	c, br, _, err := d.Dial(context.Background(), "ws://"+p.addr+"/")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Frames that came with the 101 wait in br.
	var r io.Reader = c
	if br != nil {
		r = io.MultiReader(br, c)
	}
	// The client says goodbye and reads nothing until the backend is done.
	closeFrame := ws.MaskFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(ws.StatusNormalClosure, "")))
	if err := ws.WriteFrame(c, closeFrame); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sent:
	case <-time.After(10 * time.Second):
		t.Fatal("backend did not finish sending")
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	inMessage := false
	var seen []string
	for {
		h, err := ws.ReadHeader(r)
		if err != nil {
			break // sluice cut the connection after its close timeout
		}
		if _, err := io.CopyN(io.Discard, r, h.Length); err != nil {
			break
		}
		seen = append(seen, fmt.Sprintf("%x/%v", h.OpCode, h.Fin))
		switch {
		case h.OpCode == ws.OpClose:
			return
		case h.OpCode == ws.OpContinuation && !inMessage:
			t.Fatalf("continuation frame without a message start: a refused message was torn; frames %v", seen)
		case h.OpCode.IsData():
			inMessage = !h.Fin
		}
	}
}
