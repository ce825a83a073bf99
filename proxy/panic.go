package proxy

// A panic ends one session, never the process: each goroutine that runs
// session code (readers, writers, the carry of a partial write, the
// handshake, timer callbacks) recovers, logs the panic with its stack in
// one line, counts it in sluice_panics_total{where}, and ends its session
// with 1011 to the client. net/http recovered per connection; sluice's
// own accept loop must too.

import (
	"math"
	"runtime/debug"
	"time"

	"github.com/rs/zerolog"
)

// panicRoles are the labels of sluice_panics_total.
var panicRoles = []string{"handshake", "reader", "writer", "timer"}

// notePanic logs and counts a panic p recovered in where.
func (s *Server) notePanic(where string, p any, ev func(*zerolog.Event) *zerolog.Event) {
	s.metrics.panics.WithLabelValues(where).Inc()
	e := s.log.Error().Str("where", where).Str("panic", panicText(p))
	if ev != nil {
		e = ev(e)
	}
	// One line: the stack is a field, its newlines escaped.
	e.Bytes("stack", debug.Stack()).Msg("panic recovered")
}

func panicText(p any) string {
	switch v := p.(type) {
	case error:
		return v.Error()
	case string:
		return v
	}
	return "non-error panic value"
}

// recovered ends s after a panic p in where: 1011 to the client at once,
// 1001 to the upstream after its queued data. The close timer cuts both
// if the panic left a writer unable to send them.
func (s *session) recovered(where string, p any) {
	s.srv.notePanic(where, p, s.event)
	if !s.lockFree() {
		s.wedge()
		return
	}
	defer func() {
		if recover() != nil {
			s.abort(noteInternalError) // ending it cleanly panicked too
		}
	}()
	s.end(causeInternalError, nil)
}

// recoverWriter is deferred by writer goroutines. A writer that panicked
// may have left a frame half written: a close frame after it would be
// read as its payload, so the session is cut instead.
func (s *session) recoverWriter() {
	if p := recover(); p != nil {
		s.srv.notePanic("writer", p, s.event)
		if !s.lockFree() {
			s.wedge()
			return
		}
		s.abort(noteInternalError)
	}
}

// recoverTimer is deferred by timer callbacks that run session code.
func (s *session) recoverTimer() {
	if p := recover(); p != nil {
		s.recovered("timer", p)
	}
}

// testPanic calls Options.panicHook, which only tests set, at where.
func (s *session) testPanic(where string) {
	if h := s.srv.opts.panicHook; h != nil {
		h(where, s.clientAddr)
	}
}

// lockFree reports whether s.mu can be had. Code under s.mu unlocks
// without defer (it runs per frame), so a panic there leaves it held, and
// ending the session would wait for it forever, with whatever called in:
// the guard, a timer, Shutdown. A lock busy for 50 ms is taken as left by
// the panic.
func (s *session) lockFree() bool {
	for range 50 {
		if s.mu.TryLock() {
			s.mu.Unlock()
			return true
		}
		time.Sleep(time.Millisecond)
	}
	return false
}

// wedgedMark is running's value for a wedged session: negative, far from
// what its goroutines' exits can bring back to 0.
const wedgedMark = math.MinInt32 / 2

// isWedged reports whether a panic left s's lock held (wedge).
func (s *session) isWedged() bool { return s.running.Load() < 0 }

// wedge cuts a session whose lock a panic left held: both sockets closed
// (the peers see them end without a close frame), its place under the
// limits freed and the session forgotten, so that nothing waits for it.
// Its own goroutines stuck on the lock stay: at most four, the price of a
// bug that the log line names. A session already finishing is left to it.
func (s *session) wedge() {
	for {
		n := s.running.Load()
		if n <= 0 {
			return
		}
		if s.running.CompareAndSwap(n, wedgedMark) {
			break
		}
	}
	s.event(s.srv.log.Error()).Msg("a panic left the session's lock held: its sockets are closed without a close frame")
	s.client.w.conn.Close()
	s.upstream.w.conn.Close()
	s.srv.metrics.connectionsActive.Dec()
	s.srv.forget(s)
}
