package proxy

// A panic ends one session, never the process: each goroutine that runs
// session code (readers, writers, the carry of a partial write, the
// handshake, timer callbacks) recovers, logs the panic with its stack in
// one line, counts it in sluice_panics_total{where}, and ends its session
// with 1011 to the client. net/http recovered per connection; sluice's
// own accept loop must too.

import (
	"runtime/debug"

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
