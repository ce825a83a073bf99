package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	gorilla "github.com/gorilla/websocket"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/internal/wstest"
	"github.com/sluice-proxy/sluice/proxy"
)

// quietLogs logs only what is unusual, for tests with many sessions:
// warnings, and "session closed" lines unless they carry the expected
// close codes (normal, e.g. 1000 both ways on both legs).
func quietLogs(t testing.TB, normal int) func(*proxy.Options) {
	n := strconv.Itoa(normal)
	usual := fmt.Sprintf(`"client_close_sent":%s,"client_close_received":%s,"upstream_close_sent":%s,"upstream_close_received":%s,`, n, n, n, n)
	w := filterWriter{out: testLog(t), drop: []string{`"message":"session open"`, usual}}
	return func(o *proxy.Options) {
		o.Logger = zerolog.New(w).With().Timestamp().Logger()
	}
}

// filterWriter drops log lines that contain any of drop.
type filterWriter struct {
	out  io.Writer
	drop []string
}

func (w filterWriter) Write(p []byte) (int, error) {
	for _, d := range w.drop {
		if bytes.Contains(p, []byte(d)) {
			return len(p), nil
		}
	}
	return w.out.Write(p)
}

// TestManyConcurrentSessions: 1,000 sessions open at once, each echoes 5
// messages and closes normally; sluice then holds no session.
func TestManyConcurrentSessions(t *testing.T) {
	const sessions, messages = 1000, 5
	b := newBackend(t)
	s := startSluice(t, b.url, quietLogs(t, 1000))

	var failures atomic.Int32
	fail := func(format string, args ...any) {
		if failures.Add(1) <= 10 {
			t.Errorf(format, args...)
		}
	}
	var established, finished sync.WaitGroup
	established.Add(sessions)
	finished.Add(sessions)
	proceed := make(chan struct{})
	dialSlots := make(chan struct{}, 64) // spare the listen backlog
	var connected atomic.Int32
	for i := range sessions {
		go func() {
			defer finished.Done()
			dialSlots <- struct{}{}
			d := gorilla.Dialer{HandshakeTimeout: wstest.IOTimeout}
			c, _, err := d.Dial(s.url+"/echo", nil)
			<-dialSlots
			if err != nil {
				fail("session %d: dial: %v", i, err)
				established.Done()
				return
			}
			defer c.Close()
			err = gorillaEcho(c, gorilla.TextMessage, []byte(fmt.Sprintf("session %d message 0", i)))
			if err == nil {
				connected.Add(1)
			}
			established.Done()
			if err != nil {
				fail("session %d: first echo: %v", i, err)
				return
			}
			<-proceed
			for j := 1; j < messages; j++ {
				typ := gorilla.TextMessage
				if j%2 == 0 {
					typ = gorilla.BinaryMessage
				}
				if err := gorillaEcho(c, typ, []byte(fmt.Sprintf("session %d message %d", i, j))); err != nil {
					fail("session %d: echo %d: %v", i, j, err)
					return
				}
			}
			c.WriteControl(gorilla.CloseMessage, gorilla.FormatCloseMessage(1000, ""), time.Now().Add(wstest.IOTimeout))
			c.SetReadDeadline(time.Now().Add(wstest.IOTimeout))
			_, _, err = c.ReadMessage()
			var ce *gorilla.CloseError
			if !errors.As(err, &ce) || ce.Code != 1000 {
				fail("session %d: close reply: %v", i, err)
			}
		}()
	}
	established.Wait()
	// Every session that echoed once is registered and still open.
	if got, want := s.srv.Sessions(), int(connected.Load()); got != want || want != sessions {
		t.Errorf("with every client connected: Sessions() = %d, %d clients echoed, want %d", got, want, sessions)
	}
	close(proceed)
	finished.Wait()
	waitFor(t, wstest.IOTimeout, "Sessions() to reach 0 after every client closed", func() bool { return s.srv.Sessions() == 0 })
}

// TestShutdownDrain: Shutdown sends 1001 to 100 live clients and to each of
// their backend connections, waits for the close handshakes, and returns
// nil well before its deadline with no session left.
func TestShutdownDrain(t *testing.T) {
	const sessions = 100
	b := newBackend(t)
	s := startSluice(t, b.url, quietLogs(t, 1001))

	ids := make([]string, sessions)
	results := make(chan error, sessions)
	var readers sync.WaitGroup
	defer readers.Wait()
	for i := range sessions {
		ids[i] = newID()
		u := s.url + "/echo?id=" + ids[i]
		msg := []byte(fmt.Sprintf("session %d", i))
		if i%2 == 0 {
			c, _ := dialGorilla(t, u, nil)
			if err := gorillaEcho(c, gorilla.TextMessage, msg); err != nil {
				t.Fatalf("session %d: %v", i, err)
			}
			readers.Add(1)
			go func() {
				defer readers.Done()
				c.SetReadDeadline(time.Now().Add(wstest.ShutdownTimeout))
				_, _, err := c.ReadMessage()
				var ce *gorilla.CloseError
				if !errors.As(err, &ce) || ce.Code != gorilla.CloseGoingAway {
					results <- fmt.Errorf("gorilla session %d: read ended with %v, want close 1001", i, err)
					return
				}
				results <- nil
			}()
		} else {
			c := dialCoder(t, u, nil)
			if err := coderEcho(c, websocket.MessageText, msg); err != nil {
				t.Fatalf("session %d: %v", i, err)
			}
			readers.Add(1)
			go func() {
				defer readers.Done()
				ctx, cancel := context.WithTimeout(context.Background(), wstest.ShutdownTimeout)
				defer cancel()
				_, _, err := c.Read(ctx)
				if code := websocket.CloseStatus(err); code != websocket.StatusGoingAway {
					results <- fmt.Errorf("coder session %d: read ended with %v, want close 1001", i, err)
					return
				}
				results <- nil
			}()
		}
	}
	if n := s.srv.Sessions(); n != sessions {
		t.Fatalf("Sessions() = %d before Shutdown, want %d", n, sessions)
	}

	const deadline = 8 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	began := time.Now()
	err := s.shutdown(ctx)
	took := time.Since(began)
	if err != nil {
		t.Errorf("Shutdown = %v after %v, want nil", err, took)
	}
	if took > deadline/2 {
		t.Errorf("Shutdown took %v, want well under its %v deadline", took, deadline)
	}
	if n := s.srv.Sessions(); n != 0 {
		t.Errorf("after Shutdown: Sessions() = %d, want 0", n)
	}
	for range sessions {
		if err := recv(t, results, "a client's read to end"); err != nil {
			t.Error(err)
		}
	}
	for i, id := range ids {
		if got := b.ended(t, id); got.code != gorilla.CloseGoingAway {
			t.Errorf("backend connection of session %d saw %v, want close 1001", i, got)
		}
	}
	// A new client finds nobody listening.
	d := gorilla.Dialer{HandshakeTimeout: wstest.IOTimeout}
	if c, _, err := d.Dial(s.url+"/echo", nil); err == nil {
		c.Close()
		t.Errorf("dial after Shutdown succeeded")
	}
}

// TestShutdownWaitsForHandshakeInFlight: a client whose upgrade is under
// way when Shutdown begins (sluice is waiting for the upstream's 101) is
// either refused or gets a session that Shutdown closes with 1001 and waits
// for: when Shutdown returns, every session that was opened has closed, and
// none opens afterwards. The window between sluice hijacking the client
// connection and registering its session is short, so the test tries many
// times.
func TestShutdownWaitsForHandshakeInFlight(t *testing.T) {
	const rounds = 300
	b := newBackend(t)
	for round := range rounds {
		id := newID()
		uc := b.conn(id)
		events := &sessionEvents{}
		s := startSluice(t, b.url, func(o *proxy.Options) {
			// Not the test's log: a stray session may log after the test.
			o.Logger = zerolog.New(events)
			o.CloseTimeout = time.Second
		})

		type outcome struct {
			status  int // of a refused upgrade
			dialErr error
			closed  *gorilla.CloseError
			readErr error
		}
		client := make(chan outcome, 1)
		go func() {
			d := gorilla.Dialer{HandshakeTimeout: wstest.IOTimeout}
			c, resp, err := d.Dial(s.url+"/hold?id="+id, nil)
			if err != nil {
				o := outcome{dialErr: err}
				if resp != nil {
					o.status = resp.StatusCode
				}
				client <- o
				return
			}
			defer c.Close()
			c.SetReadDeadline(time.Now().Add(wstest.IOTimeout))
			_, _, err = c.ReadMessage() // gorilla answers the close
			var ce *gorilla.CloseError
			errors.As(err, &ce)
			client <- outcome{closed: ce, readErr: err}
		}()

		recvClosed(t, uc.arrived, "the upgrade request at the backend")
		shut := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), wstest.ShutdownTimeout)
			defer cancel()
			shut <- s.shutdown(ctx)
		}()
		// Release the backend as soon as Shutdown has begun, while
		// net/http's Shutdown polls its connections at the shortest
		// interval. Draining is the only sign; spin on it.
		for deadline := time.Now().Add(wstest.IOTimeout); !s.srv.Draining(); runtime.Gosched() {
			if time.Now().After(deadline) {
				t.Fatal("Shutdown never began")
			}
		}
		close(uc.release)

		err := recv(t, shut, "Shutdown to return")
		openedAtReturn, closedAtReturn := events.counts()
		out := recv(t, client, "the client to finish")
		openedAfter, _ := events.counts()

		if err != nil {
			t.Errorf("round %d: Shutdown = %v, want nil", round, err)
		}
		switch {
		case out.dialErr != nil && out.status >= 500:
			// Refused during the drain: acceptable.
		case out.dialErr != nil:
			t.Errorf("round %d: dial failed: %v (status %d), want a 5xx or a session closed with 1001", round, out.dialErr, out.status)
		case out.closed == nil || out.closed.Code != gorilla.CloseGoingAway:
			t.Errorf("round %d: client got a 101, then its read ended with %v, want close 1001", round, out.readErr)
		}
		if openedAtReturn != closedAtReturn || openedAfter != openedAtReturn {
			t.Errorf("round %d: when Shutdown returned, %d sessions had opened and %d closed; %d had opened once the client finished. "+
				"Shutdown must wait for a session whose handshake was in flight", round, openedAtReturn, closedAtReturn, openedAfter)
			// Let the stray session end before the next test.
			waitFor(t, 2*wstest.IOTimeout, "the stray session to close", func() bool {
				o, c := events.counts()
				return o == c
			})
			return
		}
	}
}

// sessionEvents counts sluice's "session open" and "session closed" log
// lines.
type sessionEvents struct {
	mu             sync.Mutex
	opened, closed int // guarded by mu
}

func (e *sessionEvents) Write(p []byte) (int, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	switch {
	case bytes.Contains(p, []byte(`"message":"session open"`)):
		e.opened++
	case bytes.Contains(p, []byte(`"message":"session closed"`)):
		e.closed++
	}
	return len(p), nil
}

func (e *sessionEvents) counts() (opened, closed int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.opened, e.closed
}

// recvClosed waits for ch to be closed.
func recvClosed(t testing.TB, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(wstest.IOTimeout):
		t.Fatalf("timed out after %v waiting for %s", wstest.IOTimeout, what)
	}
}
