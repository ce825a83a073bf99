package integration

// End-to-end tests of sluice's keepalive: pings that keep idle connections
// alive through middleboxes, eviction of clients (and upstreams) that stop
// answering, and the separation of sluice's pongs from the backend's.

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/gobwas/ws"
	gorilla "github.com/gorilla/websocket"

	"github.com/sluice-proxy/sluice/internal/wstest"
	"github.com/sluice-proxy/sluice/keepalive"
	"github.com/sluice-proxy/sluice/proxy"
)

// kaInterval and kaTimeout are the client keepalive of these tests: short,
// so that several ping cycles fit in a second.
const (
	kaInterval = 200 * time.Millisecond
	kaTimeout  = 150 * time.Millisecond
)

// kaCoderReader reads c until it fails, sending each message on msgs and
// the final error on done. coder/websocket answers pings only while a Read
// is in progress, so every coder client of these tests runs one.
func kaCoderReader(c *websocket.Conn, msgs chan<- []byte, done chan<- error) {
	for {
		_, m, err := c.Read(context.Background())
		if err != nil {
			done <- err
			return
		}
		msgs <- m
	}
}

// TestKAIdleMiddlebox puts a middlebox with a 600 ms idle timeout between a
// client and sluice. With keepalive on, sluice's pings (and the client's
// automatic pongs) keep the path busy, so a client idle for three idle
// timeouts still talks to its backend; with keepalive off the middlebox
// cuts the connection and the client sees an abnormal closure.
func TestKAIdleMiddlebox(t *testing.T) {
	const idle = 600 * time.Millisecond

	t.Run("keepalive on", func(t *testing.T) {
		be := kaStartBackend(t, nil)
		sl := kaStartSluice(t, be.URL, func(o *proxy.Options) {
			o.Keepalive = keepalive.Config{Interval: kaInterval, Timeout: kaTimeout}
		})
		relay := kaStartRelay(t, sl.Addr, idle)

		ctx, cancel := context.WithTimeout(context.Background(), wstest.IOTimeout)
		defer cancel()
		c, _, err := websocket.Dial(ctx, "ws://"+relay.Addr+"/idle", nil)
		if err != nil {
			t.Fatalf("dial through relay: %v", err)
		}
		msgs, done := make(chan []byte, 4), make(chan error, 1)
		go kaCoderReader(c, msgs, done)
		defer func() {
			c.CloseNow()
			recv(t, done, "the client's reader to end")
		}()

		select {
		case err := <-done:
			t.Fatalf("idle client lost its connection after %v: %v (close status %d, relay idle cuts %d)",
				3*idle, err, websocket.CloseStatus(err), relay.IdleCuts.Load())
		case m := <-msgs:
			t.Fatalf("unexpected message %q while idle", m)
		case <-time.After(3 * idle):
		}
		if n := relay.IdleCuts.Load(); n != 0 {
			t.Fatalf("relay cut %d idle connections, want 0", n)
		}
		if err := c.Write(ctx, websocket.MessageText, []byte("still here")); err != nil {
			t.Fatalf("write after idling: %v", err)
		}
		if got := string(recv(t, msgs, "the echo after idling")); got != "still here" {
			t.Fatalf("echo = %q, want %q", got, "still here")
		}
		if n := sl.Metric(t, "sluice_pings_sent_total", nil); n < 3 {
			t.Errorf("sluice_pings_sent_total = %v after %v at a %v interval, want >= 3", n, 3*idle, kaInterval)
		}
	})

	t.Run("keepalive off", func(t *testing.T) {
		be := kaStartBackend(t, nil)
		sl := kaStartSluice(t, be.URL, nil)
		relay := kaStartRelay(t, sl.Addr, idle)

		ctx, cancel := context.WithTimeout(context.Background(), wstest.IOTimeout)
		defer cancel()
		c, _, err := websocket.Dial(ctx, "ws://"+relay.Addr+"/idle", nil)
		if err != nil {
			t.Fatalf("dial through relay: %v", err)
		}
		began := time.Now()
		msgs, done := make(chan []byte, 4), make(chan error, 1)
		go kaCoderReader(c, msgs, done)
		defer c.CloseNow()

		var readErr error
		select {
		case readErr = <-done:
		case m := <-msgs:
			t.Fatalf("unexpected message %q", m)
		case <-time.After(3 * idle):
			t.Fatalf("without keepalive the middlebox did not cut the idle connection within %v", 3*idle)
		}
		took := time.Since(began)
		if code := websocket.CloseStatus(readErr); code != -1 {
			t.Errorf("client read ended with close status %d (%v), want an abnormal closure (no close frame)", code, readErr)
		}
		if took < idle/2 {
			t.Errorf("connection cut after %v, want about the idle timeout %v", took, idle)
		}
		if n := relay.IdleCuts.Load(); n != 1 {
			t.Errorf("relay idle cuts = %d, want 1", n)
		}
		// sluice tells the backend that its client went away.
		end := recv(t, be.Ends, "the backend leg to end")
		if end.Code != int(ws.StatusGoingAway) {
			t.Errorf("backend leg ended with %v, want 1001", end)
		}
	})
}

// TestKAUnresponsiveClientEvicted: a client that stops answering pings is
// evicted after about Interval+Timeout: it gets a best-effort 1001 "pong
// timeout" and its backend leg is closed with 1001.
func TestKAUnresponsiveClientEvicted(t *testing.T) {
	bound := 3 * (kaInterval + kaTimeout)
	configure := func(o *proxy.Options) {
		o.Keepalive = keepalive.Config{Interval: kaInterval, Timeout: kaTimeout}
	}

	// A raw gobwas/ws client that never reads and never writes after the
	// handshake: the kernel acknowledges sluice's pings, nobody answers them.
	t.Run("silent gobwas client", func(t *testing.T) {
		be := kaStartBackend(t, nil)
		sl := kaStartSluice(t, be.URL, configure)

		ctx, cancel := context.WithTimeout(context.Background(), wstest.IOTimeout)
		defer cancel()
		conn, br, _, err := ws.Dialer{Timeout: wstest.IOTimeout}.Dial(ctx, sl.URL+"/silent")
		if err != nil {
			t.Fatalf("gobwas dial: %v", err)
		}
		defer conn.Close()
		began := time.Now()

		end := recv(t, be.Ends, "the backend leg to be closed")
		took := end.At.Sub(began)
		if end.Code != int(ws.StatusGoingAway) {
			t.Errorf("backend leg ended with %v, want 1001", end)
		}
		if took > bound {
			t.Errorf("backend leg closed %v after the handshake, want within %v", took, bound)
		}
		if took < kaTimeout {
			t.Errorf("backend leg closed %v after the handshake, before even one pong timeout (%v)", took, kaTimeout)
		}

		// Now read what sluice sent: its pings, then the close frame.
		frames, err := wstest.ReadFrames(conn, kaReader(conn, br), -1, kaMaxFrame)
		if err != nil {
			t.Fatalf("reading the evicted client's socket: %v (frames so far %d)", err, len(frames))
		}
		pings := 0
		for _, f := range frames[:len(frames)-1] {
			if f.Op != ws.OpPing || !strings.HasPrefix(string(f.Payload), keepalive.PayloadPrefix) {
				t.Errorf("frame before the close: op %v payload %q, want a %q ping", f.Op, f.Payload, keepalive.PayloadPrefix)
				continue
			}
			pings++
		}
		if pings == 0 {
			t.Errorf("sluice closed the client without pinging it first")
		}
		code, reason := wstest.CloseOf(frames[len(frames)-1])
		if code != ws.StatusGoingAway || reason != "pong timeout" {
			t.Errorf("client close = %d %q, want 1001 \"pong timeout\"", code, reason)
		}
		// The eviction is counted just after its close frames are queued,
		// from the keepalive timer's goroutine: allow it a moment.
		if n := sl.MetricSoon(t, "sluice_evictions_total", map[string]string{"reason": "pong_timeout"}, 1); n != 1 {
			t.Errorf("sluice_evictions_total{reason=pong_timeout} = %v, want 1", n)
		}
	})

	// A gorilla client that reads (so frames are consumed) but whose ping
	// handler does nothing: the connection is healthy, the peer is deaf.
	t.Run("deaf gorilla client", func(t *testing.T) {
		be := kaStartBackend(t, nil)
		sl := kaStartSluice(t, be.URL, configure)

		d := gorilla.Dialer{HandshakeTimeout: wstest.IOTimeout}
		c, _, err := d.Dial(sl.URL+"/deaf", nil)
		if err != nil {
			t.Fatalf("gorilla dial: %v", err)
		}
		defer c.Close()
		began := time.Now()
		var pings []string // written by the reader goroutine, read after done
		c.SetPingHandler(func(p string) error { pings = append(pings, p); return nil })
		done := make(chan error, 1)
		go func() {
			c.SetReadDeadline(time.Now().Add(wstest.IOTimeout))
			for {
				if _, _, err := c.ReadMessage(); err != nil {
					done <- err
					return
				}
			}
		}()

		err = recv(t, done, "sluice to close the deaf client")
		took := time.Since(began)
		var ce *gorilla.CloseError
		if !errors.As(err, &ce) || ce.Code != gorilla.CloseGoingAway || ce.Text != "pong timeout" {
			t.Errorf("client read ended with %v, want close 1001 \"pong timeout\"", err)
		}
		if took > bound {
			t.Errorf("client closed %v after the handshake, want within %v", took, bound)
		}
		if kaCountPrefix(pings, keepalive.PayloadPrefix) == 0 {
			t.Errorf("client saw no %q ping before its eviction (pings %q)", keepalive.PayloadPrefix, pings)
		}
		if end := recv(t, be.Ends, "the backend leg to be closed"); end.Code != int(ws.StatusGoingAway) {
			t.Errorf("backend leg ended with %v, want 1001", end)
		}
	})
}

// TestKAOwnPongsNotForwarded: the pongs answering sluice's pings are
// consumed by sluice, while the backend's own pings travel to the client and
// the client's pongs to them travel back to the backend.
func TestKAOwnPongsNotForwarded(t *testing.T) {
	var mu sync.Mutex
	var backendPongs, backendPings []string // guarded by mu
	be := kaStartBackend(t, func(c *kaBConn) {
		c.SetPongHandler(func(p string) error {
			mu.Lock()
			backendPongs = append(backendPongs, p)
			mu.Unlock()
			return nil
		})
		c.SetPingHandler(func(p string) error {
			mu.Lock()
			backendPings = append(backendPings, p)
			mu.Unlock()
			return c.WriteControl(gorilla.PongMessage, []byte(p), time.Now().Add(time.Second))
		})
		kaEcho(c)
	})
	sl := kaStartSluice(t, be.URL, func(o *proxy.Options) {
		o.Keepalive = keepalive.Config{Interval: kaInterval, Timeout: kaTimeout}
	})

	d := gorilla.Dialer{HandshakeTimeout: wstest.IOTimeout}
	c, _, err := d.Dial(sl.URL+"/pongs", nil)
	if err != nil {
		t.Fatalf("gorilla dial: %v", err)
	}
	defer c.Close()
	clientPings := make(chan string, 64)
	c.SetPingHandler(func(p string) error {
		clientPings <- p
		return c.WriteControl(gorilla.PongMessage, []byte(p), time.Now().Add(time.Second))
	})
	done := make(chan error, 1)
	go func() {
		for {
			if _, _, err := c.ReadMessage(); err != nil {
				done <- err
				return
			}
		}
	}()
	bc := recv(t, be.Conn, "the backend connection")

	backendPing := func() {
		t.Helper()
		if err := bc.WriteControl(gorilla.PingMessage, []byte("backend-ping"), time.Now().Add(time.Second)); err != nil {
			t.Fatalf("backend ping: %v", err)
		}
	}
	// waitBackendPongs waits until the backend has seen n "backend-ping" pongs.
	waitBackendPongs := func(n int) {
		t.Helper()
		deadline := time.Now().Add(wstest.IOTimeout)
		for {
			mu.Lock()
			got := kaCountPrefix(backendPongs, "backend-ping")
			mu.Unlock()
			if got >= n {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("backend saw %d pongs to its pings, want %d", got, n)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}

	backendPing()
	waitBackendPongs(1)
	// Several ping cycles, during which the client answers sluice's pings.
	var sluicePings, fromBackend int
	countPing := func(p string) {
		switch {
		case strings.HasPrefix(p, keepalive.PayloadPrefix):
			sluicePings++
		case p == "backend-ping":
			fromBackend++
		default:
			t.Errorf("client got ping %q, want sluice's or the backend's", p)
		}
	}
	began := time.Now()
	for sluicePings < 3 {
		countPing(recv(t, clientPings, "three of sluice's pings at the client"))
	}
	if took := time.Since(began); took > 5*kaInterval {
		t.Errorf("client took %v to answer 3 sluice pings, want within %v at a %v interval", took, 5*kaInterval, kaInterval)
	}
	// This pong follows every pong the client sent so far on the same
	// socket, so once it is in, any forwarded sluice pong would be too.
	backendPing()
	waitBackendPongs(2)

	for drained := false; !drained; {
		select {
		case p := <-clientPings:
			countPing(p)
		default:
			drained = true
		}
	}
	if fromBackend != 2 {
		t.Errorf("client got %d backend pings, want 2", fromBackend)
	}
	mu.Lock()
	defer mu.Unlock()
	if n := kaCountPrefix(backendPongs, keepalive.PayloadPrefix); n != 0 {
		t.Errorf("backend received %d pongs answering sluice's pings (%q), want 0", n, backendPongs)
	}
	if len(backendPongs) != 2 || backendPongs[0] != "backend-ping" || backendPongs[1] != "backend-ping" {
		t.Errorf("backend pongs = %q, want two \"backend-ping\"", backendPongs)
	}
	if len(backendPings) != 0 {
		t.Errorf("backend was pinged %q with upstream keepalive off, want nothing", backendPings)
	}
	select {
	case err := <-done:
		t.Errorf("client connection ended during the test: %v", err)
	default:
	}
}

// TestKAUpstreamPongTimeout: with upstream keepalive on, a backend that
// stops answering pings is given up: the client gets 1014 Bad Gateway and
// the backend a 1001 "pong timeout".
func TestKAUpstreamPongTimeout(t *testing.T) {
	const upInterval, upTimeout = 200 * time.Millisecond, 100 * time.Millisecond
	beURL, beConns := kaStartDeafBackend(t)
	sl := kaStartSluice(t, beURL, func(o *proxy.Options) {
		o.UpstreamKeepalive = keepalive.Config{Interval: upInterval, Timeout: upTimeout}
	})

	ctx, cancel := context.WithTimeout(context.Background(), wstest.IOTimeout)
	defer cancel()
	c, _, err := websocket.Dial(ctx, sl.URL+"/hung", nil)
	if err != nil {
		t.Fatalf("coder dial: %v", err)
	}
	defer c.CloseNow()
	began := time.Now()
	msgs, done := make(chan []byte, 4), make(chan error, 1)
	go kaCoderReader(c, msgs, done)
	up := recv(t, beConns, "the upstream connection")

	var readErr error
	select {
	case readErr = <-done:
	case m := <-msgs:
		t.Fatalf("unexpected message %q", m)
	case <-time.After(wstest.IOTimeout):
		t.Fatalf("client not closed %v after its backend went deaf", wstest.IOTimeout)
	}
	took := time.Since(began)
	if code := websocket.CloseStatus(readErr); code != websocket.StatusBadGateway {
		t.Errorf("client read ended with %v (status %d), want close 1014", readErr, code)
	}
	if bound := 3 * (upInterval + upTimeout); took > bound {
		t.Errorf("client closed %v after the handshake, want within %v", took, bound)
	}

	frames, err := wstest.ReadFrames(up, nil, -1, kaMaxFrame)
	if err != nil {
		t.Fatalf("reading the deaf backend's socket: %v (frames so far %d)", err, len(frames))
	}
	for _, f := range frames[:len(frames)-1] {
		if f.Op != ws.OpPing || !f.Masked || !strings.HasPrefix(string(f.Payload), keepalive.PayloadPrefix) {
			t.Errorf("frame to the upstream: op %v masked %v payload %q, want a masked %q ping", f.Op, f.Masked, f.Payload, keepalive.PayloadPrefix)
		}
	}
	if len(frames) < 2 {
		t.Errorf("upstream got %d frames, want at least one ping before the close", len(frames))
	}
	if code, reason := wstest.CloseOf(frames[len(frames)-1]); code != ws.StatusGoingAway || reason != "pong timeout" {
		t.Errorf("upstream close = %d %q, want 1001 \"pong timeout\"", code, reason)
	}
	if n := sl.MetricSoon(t, "sluice_upstream_pong_timeouts_total", nil, 1); n != 1 {
		t.Errorf("sluice_upstream_pong_timeouts_total = %v, want 1", n)
	}
}
