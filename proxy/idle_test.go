package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gorilla/websocket"
	"go.uber.org/goleak"

	"github.com/sluice-proxy/sluice/internal/wstest"
)

// readersRunning counts goroutines inside a session's pump, from a
// goroutine dump.
func readersRunning() int {
	buf := make([]byte, 1<<20)
	n := runtime.Stack(buf, true)
	return strings.Count(string(buf[:n]), "github.com/sluice-proxy/sluice/proxy.(*session).pump(")
}

// waitReaders waits until exactly want readers run.
func waitReaders(t *testing.T, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for readersRunning() != want {
		if time.Now().After(deadline) {
			t.Fatalf("%d session readers running, want %d", readersRunning(), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestIdleReadersPark checks what parking promises: an idle session has
// no reader goroutine, every message still arrives both ways after any
// number of idle spells, and sessions end as before: a client that
// vanishes is reported upstream, and a drain closes the rest. The same
// test with NoIdlePoll holds the old way to the same answers.
func TestIdleReadersPark(t *testing.T) {
	for _, mode := range []struct {
		name    string
		opts    Options
		readers int // per idle session
	}{{"epoll", Options{}, 0}, {"goroutines", Options{NoIdlePoll: true}, 2}} {
		t.Run(mode.name, func(t *testing.T) {
			opt := goleak.IgnoreCurrent()
			t.Cleanup(func() { goleak.VerifyNone(t, opt) })
			backend := newGorillaBackend(t)
			p := startLifecycleProxy(t, backend.URL, mode.opts)
			const n = 20
			clients := make([]*websocket.Conn, n)
			for i := range clients {
				c, _, err := websocket.DefaultDialer.Dial("ws://"+p.addr+"/", nil)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				clients[i] = c
			}
			waitReaders(t, n*mode.readers)

			for round := range 3 {
				var wg sync.WaitGroup
				errs := make(chan error, n)
				for i, c := range clients {
					wg.Add(1)
					go func() {
						defer wg.Done()
						want := strings.Repeat("x", i*100+round)
						c.SetWriteDeadline(time.Now().Add(10 * time.Second))
						c.SetReadDeadline(time.Now().Add(10 * time.Second))
						if err := c.WriteMessage(websocket.TextMessage, []byte(want)); err != nil {
							errs <- err
							return
						}
						_, got, err := c.ReadMessage()
						if err != nil || string(got) != want {
							errs <- errors.New("echo lost or changed after an idle spell")
						}
					}()
				}
				wg.Wait()
				close(errs)
				for err := range errs {
					t.Fatalf("round %d: %v", round, err)
				}
				waitReaders(t, n*mode.readers)
			}

			// A client that vanishes without a close frame: its parked
			// reader wakes to the EOF and the session ends.
			clients[0].UnderlyingConn().Close()
			waitSessions(t, p.Server, n-1)

			// Clients read (and so answer the close) while the drain runs.
			closed := make(chan error, n-1)
			for _, c := range clients[1:] {
				go func() {
					c.SetReadDeadline(time.Now().Add(10 * time.Second))
					_, _, err := c.ReadMessage()
					closed <- err
				}()
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := p.shutdown(ctx); err != nil {
				t.Fatalf("Shutdown: %v", err)
			}
			for range n - 1 {
				if err := <-closed; !websocket.IsCloseError(err, websocket.CloseGoingAway) {
					t.Fatalf("after Shutdown the client read %v, want 1001", err)
				}
			}
		})
	}
}

// TestParkedReadersEndOnAbort: when the close handshake times out while
// both readers are parked (the backend never answers the close), the
// abort must wake them so the session ends and its sockets close.
func TestParkedReadersEndOnAbort(t *testing.T) {
	opt := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, opt) })
	held := make(chan net.Conn, 1)
	upstream := wstest.ServeRaw(t, wstest.RawOptions{}, func(c *wstest.RawConn) {
		held <- c
		io.Copy(io.Discard, c) // never answers; until the proxy gives up
	}).URL
	p := startLifecycleProxy(t, upstream, Options{CloseTimeout: 200 * time.Millisecond})
	c, _, err := websocket.DefaultDialer.Dial("ws://"+p.addr+"/", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	<-held
	waitSessions(t, p.Server, 1)
	waitReaders(t, 0)
	if err := c.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(1000, ""), time.Now().Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	waitSessions(t, p.Server, 0)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, _, err := c.ReadMessage(); err == nil || websocket.IsCloseError(err, 1000) {
		t.Fatalf("client read %v; the backend never answered, so no close reply may be invented", err)
	}
}

// waitSessions waits until srv holds want sessions.
// No signal says a session has started or ended: it polls, with a
// deadline.
func waitSessions(t testing.TB, srv *Server, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for srv.Sessions() != want {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions, want %d", srv.Sessions(), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitParked waits until want legs have parked in srv's epoll set at least
// once: a new session's client reader waits out idleGrace in the
// handshake's goroutine before it parks.
func waitParked(t testing.TB, srv *Server, want int) {
	t.Helper()
	if srv.idle == nil {
		return
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		srv.idle.mu.Lock()
		n := len(srv.idle.legs)
		srv.idle.mu.Unlock()
		if n >= want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d legs parked, want %d", n, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSlowFeedWaitsLonger: a socket that brings a message every 600 ms,
// less often than anything but more often than idleGrace, does not meet
// its idle deadline once a second: each wait that saw data is followed by
// one twice as long (1, 2, 4 s), so in 5 s the deadline passes twice,
// not five times (at 9,000 clients and a message a second each, a
// deadline per message was a timer, a wake-up and a read per message).
func TestSlowFeedWaitsLonger(t *testing.T) {
	var waits atomic.Int32
	backend := newBenchBackend(t)
	addr, _ := startBenchProxy(t, backend.ln.Addr().String(), Options{
		waitAgainHook: func(upstream bool) {
			if upstream {
				waits.Add(1)
			}
		},
	})
	client, r := dialRaw(t, addr)
	defer client.Close()
	up := <-backend.conns
	defer up.Close()
	var fromProxy io.Reader = client
	if r != nil {
		fromProxy = io.MultiReader(r, client)
	}
	const n = 9 // 600 ms apart: 4.8 s
	msg := ws.MustCompileFrame(ws.NewTextFrame([]byte("a slow feed")))
	got := make(chan error, 1)
	go func() {
		for range n {
			f, err := wstest.ReadFrame(fromProxy)
			if err == nil && string(f.Payload) != "a slow feed" {
				err = fmt.Errorf("the client got %q", f.Payload)
			}
			if err != nil {
				got <- err
				return
			}
		}
		got <- nil
	}()
	tick := time.NewTicker(600 * time.Millisecond)
	defer tick.Stop()
	for i := range n {
		if i > 0 {
			<-tick.C // the feed's pace is the test's subject
		}
		if _, err := up.Write(msg); err != nil {
			t.Fatal(err)
		}
	}
	client.SetReadDeadline(time.Now().Add(10 * time.Second))
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if w := waits.Load(); w > 3 {
		t.Errorf("the upstream reader's idle deadline passed %d times with data in 4.8 s of a message every 600 ms, want at most 3 (waits of 1, 2, 4 s)", w)
	}
}
