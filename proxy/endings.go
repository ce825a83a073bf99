package proxy

// Why sluice ends a session, and what each side is told: one table of
// causes (endings) and one path (end) that counts, logs and queues both
// close frames. close.go carries the close frames out and ends the TCP
// connections cleanly.

import (
	"time"

	"github.com/gobwas/ws"

	"github.com/sluice-proxy/sluice/frame"
	"github.com/sluice-proxy/sluice/limiter"
)

// cause is why sluice ends a session on its own.
type cause uint8

const (
	causeNone                 cause = iota
	causeClientLost                 // the client's socket ended or failed without a close frame
	causeUpstreamLost               // the upstream's socket ended or failed without a close frame
	causeClientProtocol             // the client broke RFC 6455
	causeUpstreamProtocol           // the upstream broke RFC 6455
	causeUpstreamPongTimeout        // the upstream stopped answering sluice's pings
	causeUpstreamWriteTimeout       // the upstream stopped reading
	causeShutdown                   // sluice is draining
	causeSlow                       // eviction: the client's queue passed its high-water mark
	causeGlobalCeiling              // eviction: all queues together passed the ceiling
	causeSlowRatio                  // eviction: too many clients were slow at once
	causeWriteTimeout               // eviction: a write to the client did not finish in time
	causePongTimeout                // eviction: the client stopped answering pings
	causePauseTimeout               // eviction: the upstream was paused for this client too long
	causeReadTimeout                // eviction: the client stalled in the middle of a frame
	causeRateLimit                  // eviction: the client sent past its inbound limit
	causeInternalError              // a goroutine of the session panicked (panic.go)
	causeUpstreamCeiling            // eviction: all queues passed the ceiling, this session's mostly toward a backend not reading
	causeUpstreamFrameTimeout       // the upstream stopped in the middle of a frame
	numCauses
)

// closeOrder is when a close frame sluice makes goes out on a leg.
type closeOrder uint8

const (
	noClose       closeOrder = iota // the leg's socket is gone: nothing to send
	afterData                       // behind what is queued for the leg
	aheadOfData                     // at once, discarding what is queued
	afterUpstream                   // client only: once the upstream has answered its close
)

// Placeholders for close codes known only when a session ends.
const (
	codeUpstreamFailure ws.StatusCode = 1 // Options.UpstreamFailureCode
	codeOfViolation     ws.StatusCode = 2 // the frame.Error's code and reason
)

// legEnd is what one leg is told when a session ends.
type legEnd struct {
	order   closeOrder
	code    ws.StatusCode
	text    string
	noReply bool // its close reply is not awaited: it broke the protocol or does not read
}

// ending is one row of the endings table.
type ending struct {
	label    string // the log's reason and, for an eviction, sluice_evictions_total's label
	eviction bool   // counted, logged and listed as an eviction
	client   legEnd
	upstream legEnd
}

// evicted is what the upstream hears when its client is evicted: its
// queued data still goes first, nothing from the client is lost.
var evicted = legEnd{afterData, ws.StatusGoingAway, "client evicted", false}

// endings is the table of causes. The README's close-code table says the
// same (TestEndingsMatchREADME keeps them in step).
var endings = [numCauses]ending{
	causeClientLost: {"client lost", false,
		legEnd{noClose, 0, "", false},
		legEnd{afterData, ws.StatusGoingAway, "client went away", false}},
	causeUpstreamLost: {"upstream lost", false,
		legEnd{afterData, codeUpstreamFailure, "upstream connection lost", false},
		legEnd{noClose, 0, "", false}},
	causeClientProtocol: {"client protocol error", false,
		legEnd{afterUpstream, codeOfViolation, "", true},
		legEnd{afterData, ws.StatusGoingAway, "client protocol error", false}},
	causeUpstreamProtocol: {"upstream protocol error", false,
		legEnd{afterData, codeUpstreamFailure, "upstream protocol error", false},
		legEnd{aheadOfData, codeOfViolation, "", true}},
	causeUpstreamPongTimeout: {"upstream pong timeout", false,
		legEnd{afterData, codeUpstreamFailure, "upstream stopped answering pings", false},
		legEnd{aheadOfData, ws.StatusGoingAway, "pong timeout", true}},
	causeUpstreamWriteTimeout: {"upstream write timeout", false,
		legEnd{afterData, codeUpstreamFailure, "upstream stopped reading", false},
		legEnd{aheadOfData, ws.StatusGoingAway, "write timeout", true}},
	// The upstream's stream has no frame boundary left to close at: its
	// socket is closed. A frame already being spliced to the client is
	// torn too, and its socket cut (writeFailed).
	causeUpstreamFrameTimeout: {"upstream frame read timeout", false,
		legEnd{afterData, codeUpstreamFailure, "upstream stalled mid-frame", false},
		legEnd{noClose, 0, "", false}},
	causeShutdown: {"shutdown", false,
		legEnd{afterUpstream, ws.StatusGoingAway, "server shutting down", false},
		legEnd{afterData, ws.StatusGoingAway, "proxy shutting down", false}},
	causeSlow:          {"slow", true, legEnd{aheadOfData, frame.StatusTryAgainLater, "slow client", true}, evicted},
	causeGlobalCeiling: {"global_ceiling", true, legEnd{aheadOfData, frame.StatusTryAgainLater, "slow client", true}, evicted},
	causeSlowRatio:     {"slow_ratio", true, legEnd{aheadOfData, frame.StatusTryAgainLater, "slow client", true}, evicted},
	causeWriteTimeout:  {"write_timeout", true, legEnd{aheadOfData, frame.StatusTryAgainLater, "slow client", true}, evicted},
	causePongTimeout:   {"pong_timeout", true, legEnd{aheadOfData, ws.StatusGoingAway, "pong timeout", true}, evicted},
	causePauseTimeout:  {"pause_timeout", true, legEnd{aheadOfData, frame.StatusTryAgainLater, "slow client", true}, evicted},
	causeReadTimeout:   {"read_timeout", true, legEnd{afterUpstream, frame.StatusTryAgainLater, "frame read timeout", true}, evicted},
	causeRateLimit:     {"rate_limit", true, legEnd{afterUpstream, ws.StatusPolicyViolation, "rate limit", true}, evicted},
	// Nothing of the session's state is trusted after a panic: neither
	// side's close reply is awaited.
	causeInternalError: {"internal error", false,
		legEnd{aheadOfData, ws.StatusInternalServerError, "internal error", true},
		legEnd{afterData, ws.StatusGoingAway, "proxy internal error", true}},
	// The client reads: it gets what its backend sent, then 1013. The
	// backend does not: its close goes ahead of what it has not taken.
	causeUpstreamCeiling: {"upstream_ceiling", true,
		legEnd{afterData, frame.StatusTryAgainLater, "upstream not reading", false},
		legEnd{aheadOfData, ws.StatusGoingAway, "not reading", true}},
}

// evictionReasons lists the labels of sluice_evictions_total.
func evictionReasons() []string {
	var out []string
	for _, e := range endings {
		if e.eviction {
			out = append(out, e.label)
		}
	}
	return out
}

// end ends the session for c; fe is the violation, for the protocol
// causes. The first cause is the session's; a later one still closes
// what the first left open, and an eviction after another cause only
// moves the client's close ahead of its queued data.
func (s *session) end(c cause, fe *frame.Error) {
	if s.isWedged() {
		return // cut already; its lock may never be free again
	}
	e := &endings[c]
	var msgs int
	var byts, unsent, up int64
	if e.eviction {
		// Read the queue before a close frame's priority discards it.
		q := s.client.queue()
		msgs, byts, unsent, up = q.Messages(), q.Bytes(), q.Unsent(), s.upstream.queuedBytes()
		q.MarkEvicted()
	}
	s.mu.Lock()
	if s.aborted {
		s.mu.Unlock()
		return
	}
	if e.eviction && s.endNote != noteNone {
		// Ending already for another reason, whose close stands; but the
		// leg that does not read cannot take what is left, so its close
		// overtakes it: the stream it gets ends early and never has a gap.
		l, le := &s.client, e.client
		if c == causeUpstreamCeiling {
			l, le = &s.upstream, e.upstream
		}
		l.end.step(evNoReply)
		s.closeLeg(l, le.code, le.text, true)
		s.checkDoneLocked()
		s.unlock()
		return
	}
	first := s.cause == causeNone
	if first {
		s.cause = c
		if fe != nil {
			s.noteEnd(noteCause, fe.Reason)
		} else {
			s.noteEnd(noteCause, "")
		}
	}
	s.mu.Unlock()
	if first && e.eviction {
		// Counted and logged before the close frames go, so both are
		// there by the time the client or the backend sees the close.
		s.srv.metrics.evictions.WithLabelValues(e.label).Inc()
		s.srv.mu.Lock()
		s.srv.evictions.add(Eviction{Time: time.Now(), ID: s.id, Client: s.clientAddr, Reason: e.label, QueueMessages: msgs, QueueBytes: byts, UnsentBytes: unsent, UpstreamBytes: up})
		s.srv.mu.Unlock()
		s.event(s.srv.log.Warn()).Str("reason", e.label).Int("queue_messages", msgs).Int64("queue_bytes", byts).Int64("unsent_bytes", unsent).Int64("upstream_bytes", up).Msg("client evicted")
	}

	s.mu.Lock()
	s.tell(&s.upstream, e.upstream, fe)
	s.tell(&s.client, e.client, fe)
	s.checkDoneLocked()
	s.unlock()
}

// tell queues l's close frame as le says. Callers hold s.mu.
func (s *session) tell(l *leg, le legEnd, fe *frame.Error) {
	code, text := le.code, le.text
	switch code {
	case codeUpstreamFailure:
		code = s.srv.opts.UpstreamFailureCode
	case codeOfViolation:
		code, text = fe.Code, fe.Reason
	}
	if le.noReply {
		l.end.step(evNoReply)
	}
	switch le.order {
	case afterData:
		s.closeLeg(l, code, text, false)
	case aheadOfData:
		s.closeLeg(l, code, text, true)
	case afterUpstream:
		s.holdClientClose(code, text)
	}
}

// holdBound is the longest a client's close waits for the upstream's
// answer to its own close (afterUpstream), as a share of CloseTimeout:
// the rest of the close handshake needs the other half.
func (s *session) holdBound() time.Duration { return s.srv.opts.CloseTimeout / 2 }

// holdClientClose keeps the client's close back until the upstream has
// answered its close, or is gone, or holdBound passes: what the upstream
// sends meanwhile is still forwarded. Callers hold s.mu.
func (s *session) holdClientClose(code ws.StatusCode, text string) {
	c := &s.client
	if c.end.lost() || c.end.out != outNone {
		return
	}
	up := &s.upstream
	if up.end.lost() || up.end.in == inReceived {
		s.closeLeg(c, code, text, false)
		return
	}
	s.hold.code, s.hold.text = code, text
	c.end.step(evCloseHeld)
	if s.hold.timer == nil {
		s.hold.timer = time.AfterFunc(s.holdBound(), s.releaseHold)
	} else {
		s.hold.timer.Reset(s.holdBound())
	}
}

// releaseHold queues the held client close: holdBound has passed.
func (s *session) releaseHold() {
	s.mu.Lock()
	if s.client.end.out == outHeld {
		s.closeLeg(&s.client, s.hold.code, s.hold.text, false)
	}
	s.checkDoneLocked()
	s.unlock()
}

// heldClose is a client close waiting for the upstream (afterUpstream).
type heldClose struct {
	code  ws.StatusCode
	text  string
	timer *time.Timer // runs releaseHold; made once
}

// violation: src broke the protocol.
func (s *session) violation(src *leg, fe *frame.Error) {
	if src.upstream {
		s.end(causeUpstreamProtocol, fe)
	} else {
		s.end(causeClientProtocol, fe)
	}
	s.srv.metrics.protocolErrors.WithLabelValues(src.name(), closeCodeLabel(fe.Code)).Inc()
	s.event(s.srv.log.Warn()).Str("leg", src.name()).Int("code", int(fe.Code)).Str("error", fe.Reason).Msg("protocol violation")
}

// guardEvict is the Budget's way to evict this session, or to take back
// the kernel memory of one it evicted already.
func (s *session) guardEvict(r limiter.Reason) {
	// The Budget's guard is one goroutine for the whole server.
	defer s.recoverTimer()
	switch r {
	case limiter.ReasonGlobalCeiling:
		s.end(causeGlobalCeiling, nil)
	case limiter.ReasonUpstreamCeiling:
		s.end(causeUpstreamCeiling, nil)
	case limiter.ReasonReclaim:
		s.reclaim()
	default:
		s.end(causeSlowRatio, nil)
	}
}

// reclaim resets the connection of an evicted client that has not read
// its close yet, which frees what the kernel holds for it: the memory is
// needed, and the client is not reading.
func (s *session) reclaim() {
	s.mu.Lock()
	if !s.client.end.lost() && s.client.end.read != readDone {
		s.noteEnd(noteReclaimed, "")
		s.client.end.step(evLost)
		s.doom(&s.client, true)
		s.checkDoneLocked()
	}
	s.unlock()
}

// goAway starts a graceful close for shutdown: 1001 to the upstream after
// its queued data, and to the client once the upstream has answered.
func (s *session) goAway() { s.end(causeShutdown, nil) }

// abort closes both sockets and queues, which ends every goroutine of the
// session.
func (s *session) abort(n endNote) {
	if s.isWedged() {
		return
	}
	s.mu.Lock()
	s.noteEnd(n, "")
	s.abortLocked()
	s.unlock()
}

// endNote is what first began a session's end, for its "session closed"
// line: a peer's close, a lost socket, a failed write, a cause of sluice's
// own (endings), or one of the last resorts below.
type endNote uint8

const (
	noteNone endNote = iota
	noteClientClosed
	noteUpstreamClosed
	noteClientLost          // with the error
	noteUpstreamLost        // with the error
	noteClientWriteFailed   // with the error
	noteUpstreamWriteFailed // with the error
	noteCause               // the session's cause, with a violation's reason
	noteReclaimed           // an evicted client reset for its kernel buffers
	noteCloseTimeout        // the close handshake ran past CloseTimeout
	noteShutdownTimeout     // Shutdown's context ended first
	noteInternalError       // ending a session that panicked panicked too
	numEndNotes
)

var endNoteText = [numEndNotes]string{
	noteClientClosed:        "client closed",
	noteUpstreamClosed:      "upstream closed",
	noteClientLost:          "client lost",
	noteUpstreamLost:        "upstream lost",
	noteClientWriteFailed:   "client write failed",
	noteUpstreamWriteFailed: "upstream write failed",
	noteReclaimed:           "evicted client reset to free its kernel buffers",
	noteCloseTimeout:        "close handshake timed out",
	noteShutdownTimeout:     "shutdown timeout",
	noteInternalError:       "internal error",
}

// text is the note as the log gives it; c is the session's cause.
func (n endNote) text(c cause, detail string) string {
	t := endNoteText[n]
	if n == noteCause {
		t = endings[c].label
	}
	if detail == "" {
		return t
	}
	return t + ": " + detail
}

// note is the client's or the upstream's form of a note, as l is.
func (l *leg) note(client, upstream endNote) endNote {
	if l.upstream {
		return upstream
	}
	return client
}
