package proxy

import (
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/wstest"

	"github.com/gobwas/ws"

	"github.com/sluice-proxy/sluice/keepalive"
)

// TestPanicEndsOneSession: a panic in one session's reader, timer or
// handshake ends that session (1011 to its client) or that connection,
// never the process; it is logged with its stack and counted, and every
// other session goes on.
func TestPanicEndsOneSession(t *testing.T) {
	checkLeaks(t)
	// 127.0.0.2 is the doomed client, wherever the hook runs.
	const doomed = "127.0.0.2:"
	for _, where := range []string{"reader", "timer", "handshake"} {
		t.Run(where, func(t *testing.T) {
			b := newEchoBackend(t)
			opts := Options{panicHook: func(w, client string) {
				if w == where && strings.HasPrefix(client, doomed) {
					panic("injected " + w + " panic")
				}
			}}
			if where == "timer" {
				opts.Keepalive = keepalive.Config{Interval: 50 * time.Millisecond, Timeout: 40 * time.Millisecond}
			}
			p := startTestProxy(t, b, opts)
			neighbour := mustUpgrade(t, p, "127.0.0.1")
			echoPastPings(t, neighbour, "before")
			if where == "handshake" {
				// Dropped without an answer: its request never reaches
				// the upstream.
				d := mustDialRaw(t, p.addr, "127.0.0.2")
				if got := answerOf(d, 5*time.Second); got != 0 {
					t.Errorf("a handshake that panicked was answered %d", got)
				}
			} else {
				c := mustUpgrade(t, p, "127.0.0.2")
				if where == "reader" {
					// One write: the panic comes with the header, and the
					// session may be gone before a second write of the payload.
					frame, err := ws.CompileFrame(ws.MaskFrame(ws.NewTextFrame([]byte("boom"))))
					if err != nil {
						t.Fatal(err)
					}
					if _, err := c.Write(frame); err != nil {
						t.Fatal(err)
					}
				}
				// The client's pings from sluice come first under keepalive.
				for {
					h, p := c.readFrame(t)
					if h.OpCode == ws.OpPing {
						continue
					}
					if h.OpCode != ws.OpClose || len(p) < 2 || ws.StatusCode(uint16(p[0])<<8|uint16(p[1])) != ws.StatusInternalServerError {
						t.Fatalf("doomed client got %v %q, want close 1011", h.OpCode, p)
					}
					break
				}
			}
			for i := range 3 {
				echoPastPings(t, neighbour, "after "+string(rune('a'+i)))
			}
			if n := counterValue(p.metrics.panics.WithLabelValues(where)); n < 1 {
				t.Errorf("sluice_panics_total{where=%q} = %v", where, n)
			}
			if p.logs.Count(`"panic recovered"`, `"where":"`+where+`"`, `"stack":"goroutine `) < 1 {
				t.Errorf("no panic line with its stack:\n%s", p.logs.String())
			}
			if res, _, c := upgrade(t, p, "127.0.0.1"); c == nil {
				t.Errorf("a new client after the panic: %s", res.Status)
			} else if res.StatusCode != http.StatusSwitchingProtocols {
				t.Errorf("status %s", res.Status)
			}
		})
	}
}

// echoPastPings sends msg through c and wants it back, answering nothing
// and skipping the pings sluice sends meanwhile.
func echoPastPings(t *testing.T, c *wsClient, msg string) {
	t.Helper()
	if err := ws.WriteFrame(c, ws.MaskFrame(ws.NewTextFrame([]byte(msg)))); err != nil {
		t.Fatal(err)
	}
	for {
		h, p := c.readFrame(t)
		if h.OpCode == ws.OpPing {
			continue
		}
		if h.OpCode != ws.OpText || string(p) != msg {
			t.Fatalf("echo: got %v %q, want text %q", h.OpCode, p, msg)
		}
		return
	}
}

// mustDialRaw connects to addr from local and sends a whole upgrade
// request.
func mustDialRaw(t *testing.T, addr, local string) net.Conn {
	t.Helper()
	c := partialRequest(t, addr, local)
	if _, err := io.WriteString(c, "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	return c
}

// A panic while the session's own lock is held (code under s.mu unlocks
// without defer) must not hang its recovery, nor anything that calls into
// the session afterwards (the guard, timers, Shutdown): the session is cut
// without the lock and forgotten, and the others go on.
func TestPanicUnderSessionLock(t *testing.T) {
	b := newEchoBackend(t)
	p := startTestProxy(t, b, Options{})
	mustUpgrade(t, p, "127.0.0.1")
	live := p.Server.liveSessions()
	if len(live) != 1 {
		t.Fatalf("%d sessions, want 1", len(live))
	}
	ss := live[0]
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer ss.recoverTimer()
		ss.mu.Lock()
		panic("injected under s.mu")
	}()
	select {
	case <-done:
	case <-time.After(wstest.IOTimeout):
		t.Fatal("recovering a panic under s.mu hangs: it waits for the lock the panic left held")
	}
	if !ss.isWedged() || p.Server.Sessions() != 0 {
		t.Fatalf("wedged %v, %d sessions listed; want the session cut and forgotten", ss.isWedged(), p.Server.Sessions())
	}
	ended := make(chan struct{})
	go func() { ss.end(causeSlow, nil); close(ended) }() // the guard calling in
	select {
	case <-ended:
	case <-time.After(wstest.IOTimeout):
		t.Fatal("ending a wedged session waits for its lock")
	}
	mustUpgrade(t, p, "127.0.0.1").echo(t, "another session")
}
