package proxy

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"runtime"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/wstest"
)

// partialRequest opens a connection to addr from local and sends the
// start of an upgrade request, never its end.
func partialRequest(t *testing.T, addr, local string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: wstest.IOTimeout, LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"); err != nil {
		t.Fatal(err)
	}
	return c
}

// answerOf reads the status of c's answer; "" when c is closed without one
// or nothing comes within d.
func answerOf(c net.Conn, d time.Duration) int {
	c.SetReadDeadline(time.Now().Add(d))
	res, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0
	}
	res.Body.Close()
	return res.StatusCode
}

// TestPartialRequestsCount: requests still arriving count toward
// MaxConnections and MaxConnectionsPerIP, so that a flood of partial
// requests holds no more goroutines than the limits allow: the excess is
// refused at once, with 503 or 429.
func TestPartialRequestsCount(t *testing.T) {
	checkLeaks(t)
	t.Run("max connections", func(t *testing.T) {
		b := newEchoBackend(t)
		p := startTestProxy(t, b, Options{MaxConnections: 5})
		before := runtime.NumGoroutine()
		var held []net.Conn
		for range 5 {
			held = append(held, partialRequest(t, p.addr, "127.0.0.1"))
		}
		waitHandshakes(t, p.Server, 5)
		// Under way is not yet counted: wait for all five to hold a slot,
		// or an excess request could take one a held request was to take.
		waitCounted(t, func() bool { return p.Server.adm.Connections() == 5 })
		const excess = 100
		for i := range excess {
			c := partialRequest(t, p.addr, "127.0.0.1")
			if got := answerOf(c, wstest.IOTimeout); got != http.StatusServiceUnavailable {
				t.Fatalf("partial request %d past the limit: status %d, want 503", 5+i, got)
			}
			c.Close()
		}
		// The refused ones' goroutines end once their clients have gone:
		// what remains is the five held and the backend's, far fewer
		// than the requests sent.
		deadline := time.Now().Add(wstest.IOTimeout)
		for runtime.NumGoroutine()-before > 5+5 {
			if time.Now().After(deadline) {
				t.Fatalf("%d goroutines more than before for 5 held partial requests", runtime.NumGoroutine()-before)
			}
			time.Sleep(10 * time.Millisecond)
		}
		for _, c := range held {
			if got := answerOf(c, 10*time.Millisecond); got != 0 {
				t.Errorf("a held request was answered %d", got)
			}
		}
		if n := p.rejected("max_connections"); n != excess {
			t.Errorf("rejected{max_connections} = %v, want %d", n, excess)
		}
	})
	t.Run("per IP", func(t *testing.T) {
		b := newEchoBackend(t)
		p := startTestProxy(t, b, Options{MaxConnectionsPerIP: 1})
		partialRequest(t, p.addr, "127.0.0.1")
		waitHandshakes(t, p.Server, 1)
		waitCounted(t, func() bool { return p.Server.adm.ConnectionsFrom("127.0.0.1") == 1 })
		if got := answerOf(partialRequest(t, p.addr, "127.0.0.1"), wstest.IOTimeout); got != http.StatusTooManyRequests {
			t.Errorf("second partial request from one address: status %d, want 429", got)
		}
		mustUpgrade(t, p, "127.0.0.2").echo(t, "another address")
	})
}

// TestRequestMustProgress: a request that stops arriving is dropped after
// HandshakeIdleTimeout, long before HandshakeTimeout, and its slot is
// free again.
func TestRequestMustProgress(t *testing.T) {
	checkLeaks(t)
	b := newEchoBackend(t)
	p := startTestProxy(t, b, Options{MaxConnections: 1, HandshakeTimeout: time.Minute, HandshakeIdleTimeout: 100 * time.Millisecond})
	c := partialRequest(t, p.addr, "127.0.0.1")
	began := time.Now()
	c.SetReadDeadline(began.Add(wstest.IOTimeout))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("a stalled request was answered")
	}
	if d := time.Since(began); d >= wstest.IOTimeout {
		t.Fatalf("a stalled request was held %v", d)
	}
	waitHandshakes(t, p.Server, 0)
	mustUpgrade(t, p, "").echo(t, "the slot is free")
}

// waitHandshakes waits until srv has n connections accepted and not yet
// sessions.
// waitCounted waits until counted reports that the admission counts are
// as the test set them up.
func waitCounted(t *testing.T, counted func() bool) {
	t.Helper()
	deadline := time.Now().Add(wstest.IOTimeout)
	for !counted() {
		if time.Now().After(deadline) {
			t.Fatal("the held connections were not counted")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func waitHandshakes(t *testing.T, srv *Server, n int) {
	t.Helper()
	deadline := time.Now().Add(wstest.IOTimeout)
	for {
		srv.mu.Lock()
		got := len(srv.handshakes)
		srv.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d handshakes under way, want %d", got, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
