package proxy

// Ending a session. A session ends in one of two ways: a peer closes (its
// close frame is relayed as it came, and the other side's reply relayed
// back), or sluice ends it for a cause of its own. Every such cause is a
// row of the endings table, which says what each leg is told and when;
// end is the one path that counts, logs and queues both close frames.
//
// Nothing a peer sent before it learned of the end is lost:
//
//   - afterData: the close goes behind what is queued for the leg.
//   - afterUpstream (client leg only): the client's close waits until the
//     upstream has answered its own close (or is gone, or holdBound has
//     passed), so the client receives everything the backend sent before
//     it learned of the end, then the close.
//   - aheadOfData is kept for peers that are not reading (evictions) or
//     that broke the protocol: waiting would only hold memory.
//
// And TCP ends without a reset while peers behave: after its close frame
// sluice half-closes the client's socket and reads (discarding) until the
// client's FIN; on the upstream it waits for the backend to close first,
// as RFC 6455 §7.1.1 has servers do, so TIME_WAIT stays on the backend.
// Only a peer that does not finish within Options.CloseTimeout is cut off,
// and a client socket cut off with bytes still unsent is reset, so that
// its kernel buffer is freed at once instead of lingering in an orphan.

import (
	"errors"
	"net"
	"os"
	"time"

	"github.com/gobwas/ws"

	"sluice/frame"
	"sluice/limiter"
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
	e := &endings[c]
	var msgs, depth int
	var byts, unsent int64
	if e.eviction {
		// Read the queue before a close frame's priority discards it.
		q := s.client.out
		msgs, depth, byts, unsent = q.Messages(), q.Depth(), q.Bytes(), q.Unsent()
		s.client.out.MarkEvicted()
	}
	s.mu.Lock()
	if s.aborted {
		s.mu.Unlock()
		return
	}
	if e.eviction && s.endReason != "" {
		// Ending already for another reason, whose close stands; but the
		// client cannot take what is left, so its close overtakes it: the
		// stream it gets ends early and never has a gap.
		s.client.noReply = true
		s.closeLeg(&s.client, e.client.code, e.client.text, true)
		s.checkDoneLocked()
		s.unlock()
		return
	}
	first := s.cause == causeNone
	if first {
		s.cause = c
		if fe != nil {
			s.noteEnd(e.label + ": " + fe.Reason)
		} else {
			s.noteEnd(e.label)
		}
	}
	s.mu.Unlock()
	if first && e.eviction {
		// Counted and logged before the close frames go, so both are
		// there by the time the client or the backend sees the close.
		s.srv.metrics.evictions.WithLabelValues(e.label).Inc()
		s.srv.mu.Lock()
		s.srv.evictions.add(Eviction{Time: time.Now(), ID: s.id, Client: s.clientAddr, Reason: e.label, QueueMessages: msgs, Depth: depth, QueueBytes: byts, UnsentBytes: unsent})
		s.srv.mu.Unlock()
		s.event(s.srv.log.Warn()).Str("reason", e.label).Int("queue_messages", msgs).Int("depth", depth).Int64("queue_bytes", byts).Int64("unsent_bytes", unsent).Msg("client evicted")
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
		l.noReply = true
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
	if c.dead || c.closeQueued || s.hold.on {
		return
	}
	up := &s.upstream
	if up.dead || up.closeRcvd {
		s.closeLeg(c, code, text, false)
		return
	}
	s.hold = heldClose{on: true, code: code, text: text}
	if s.hold.timer == nil {
		s.hold.timer = time.AfterFunc(s.holdBound(), s.releaseHold)
	} else {
		s.hold.timer.Reset(s.holdBound())
	}
}

// releaseHold queues the held client close: holdBound has passed.
func (s *session) releaseHold() {
	s.mu.Lock()
	if s.hold.on {
		s.closeLeg(&s.client, s.hold.code, s.hold.text, false)
	}
	s.checkDoneLocked()
	s.unlock()
}

// heldClose is a client close waiting for the upstream (afterUpstream).
type heldClose struct {
	on    bool
	code  ws.StatusCode
	text  string
	timer *time.Timer // runs releaseHold; made once
}

// closeReceived handles a valid or invalid close frame from src.
func (s *session) closeReceived(src, dst *leg, payload, wire []byte) {
	code, _, err := frame.ParseClose(payload)
	if err != nil {
		s.violation(src, err.(*frame.Error))
		return
	}
	s.srv.metrics.closeCode(src.upstream, false, code).Inc()
	s.mu.Lock()
	defer s.unlock()
	src.closeRcvd = true
	src.rcvdCode = code
	if src.ka != nil {
		// It said goodbye: silence from now on is not staleness.
		src.ka.Stop()
	}
	s.noteEnd(src.name() + " closed")
	switch {
	case !dst.upstream && s.hold.on:
		// The upstream answered the close sluice sent it: the client's
		// own close may go now, behind everything before it.
		s.closeLeg(dst, s.hold.code, s.hold.text, false)
	case !dst.closeQueued && !dst.dead:
		// Pass the close on as it came: same code, same reason, same mask.
		seg := limiter.NewSegment(len(wire))
		*seg.Buf = append(*seg.Buf, wire...)
		s.queueClose(dst, seg, code, false)
	}
	if !src.closeQueued && dst.dead {
		// Nobody can answer for the other side: echo the code.
		echo := code
		if echo == ws.StatusNoStatusRcvd {
			echo = ws.StatusNormalClosure
		}
		s.queueClose(src, closeSegment(echo, "", src.upstream), echo, false)
	}
	s.checkDoneLocked()
}

// closeSegment makes a close frame sluice originates.
func closeSegment(code ws.StatusCode, reason string, masked bool) *limiter.Segment {
	seg := limiter.NewSegment(frame.MaxControlFrame)
	*seg.Buf = frame.AppendClose(*seg.Buf, code, reason, masked)
	return seg
}

// queueClose queues seg as l's close frame and starts the close timer.
// Callers hold s.mu.
func (s *session) queueClose(l *leg, seg *limiter.Segment, code ws.StatusCode, first bool) {
	if l.dead || !l.out.PushClose(seg, first) {
		seg.Free()
		return
	}
	l.kick()
	l.closeQueued = true
	l.sentCode = code
	s.armCloseTimerLocked()
}

// closeLeg queues a close frame that sluice originates toward l. A close
// held for the client (holdClientClose) takes the place of any other.
// Callers hold s.mu.
func (s *session) closeLeg(l *leg, code ws.StatusCode, reason string, first bool) {
	if l == &s.client && s.hold.on {
		s.hold.on = false
		s.hold.timer.Stop()
		code, reason = s.hold.code, s.hold.text
	}
	if l.dead {
		return
	}
	if l.closeQueued {
		if first {
			// Let the queued close overtake the data.
			l.out.Expedite()
			l.kick()
		}
		return
	}
	s.queueClose(l, closeSegment(code, reason, l.upstream), code, first)
}

func (s *session) armCloseTimerLocked() {
	if s.closeTimer == nil && !s.aborted {
		s.closeTimer = time.AfterFunc(s.srv.opts.CloseTimeout, func() { s.abort("close handshake timed out") })
	}
}

// closeWritten: the writer put dst's close frame on the wire.
func (s *session) closeWritten(dst *leg) {
	s.mu.Lock()
	defer s.unlock()
	dst.closeSent = true
	s.srv.metrics.closeCode(dst.upstream, true, dst.sentCode).Inc()
	if dst.draining && dst.closeRcvd {
		// The handshake is done: wake the client's reader from its drain.
		dst.conn.SetReadDeadline(time.Now())
	}
	s.checkDoneLocked()
}

// checkDoneLocked ends the session once both legs have finished their
// close handshakes and both sockets have been read to their end. Callers
// hold s.mu.
func (s *session) checkDoneLocked() {
	if s.client.finished() && s.upstream.finished() && s.client.readDone && s.upstream.readDone {
		s.abortLocked()
	}
}

// noteEnd records the first reason the session began to end.
// Callers hold s.mu.
func (s *session) noteEnd(reason string) {
	if s.endReason == "" {
		s.endReason = reason
	}
}

// lost: src's socket failed or ended without a close frame.
func (s *session) lost(src *leg, err error) {
	s.mu.Lock()
	if s.aborted {
		s.unlock()
		return
	}
	src.dead = true
	s.doom(src, false)
	if src.ka != nil {
		src.ka.Stop()
	}
	if src.closeRcvd {
		// It closed properly before: the socket ending is expected.
		s.checkDoneLocked()
		s.unlock()
		return
	}
	s.noteEnd(src.name() + " lost: " + errString(err))
	s.unlock()
	if src.upstream {
		s.end(causeUpstreamLost, nil)
	} else {
		s.end(causeClientLost, nil)
	}
}

// writeFailed: a write to dst failed or timed out.
func (s *session) writeFailed(dst *leg, err error) {
	timeout := errors.Is(err, os.ErrDeadlineExceeded)
	switch {
	case timeout && dst.upstream:
		s.end(causeUpstreamWriteTimeout, nil)
	case timeout:
		s.end(causeWriteTimeout, nil)
	}
	s.mu.Lock()
	if s.aborted {
		s.unlock()
		return
	}
	dst.dead = true
	dst.out.Close()
	// A client that stopped reading would keep what the kernel holds for
	// it in an orphaned socket for minutes: reset it instead.
	s.doom(dst, !dst.upstream)
	s.noteEnd(dst.name() + " write failed: " + errString(err))
	s.unlock()
	if dst.upstream {
		s.end(causeUpstreamLost, nil)
	} else {
		s.end(causeClientLost, nil)
	}
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
	switch r {
	case limiter.ReasonGlobalCeiling:
		s.end(causeGlobalCeiling, nil)
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
	if !s.client.dead && !s.client.readDone {
		s.noteEnd("evicted client reset to free its kernel buffers")
		s.client.dead = true
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
func (s *session) abort(reason string) {
	s.mu.Lock()
	if reason != "" {
		s.noteEnd(reason)
	}
	s.abortLocked()
	s.unlock()
}

// abortLocked stops the session; the sockets close in unlock. A client
// socket not read to its end is reset: its peer is not finishing, and a
// plain close would leave its unsent bytes in an orphan. Callers hold s.mu.
func (s *session) abortLocked() {
	if s.aborted {
		return
	}
	s.aborted = true
	if s.closeTimer != nil {
		s.closeTimer.Stop()
	}
	if s.hold.timer != nil {
		s.hold.timer.Stop()
	}
	for _, l := range []*leg{&s.client, &s.upstream} {
		if l.ka != nil {
			l.ka.Stop()
		}
		l.out.Close()
		s.doom(l, !l.upstream && !l.readDone)
	}
}

// doom marks l's socket to be closed, reset first if reset is set, when
// s.mu is let go (unlock): a close can write (TLS close_notify), and no
// network I/O happens under a lock. Callers hold s.mu.
func (s *session) doom(l *leg, reset bool) {
	l.doomed = true
	l.resetOnClose = l.resetOnClose || reset
}

// unlock lets go of s.mu, then closes the sockets doomed meanwhile, and
// wakes their parked readers to find them closed and end.
func (s *session) unlock() {
	var close [2]*leg
	var reset [2]bool
	for i, l := range []*leg{&s.client, &s.upstream} {
		if l.doomed && !l.connClosed {
			l.connClosed = true
			close[i], reset[i] = l, l.resetOnClose
		}
	}
	s.mu.Unlock()
	for i, l := range close {
		if l == nil {
			continue
		}
		if reset[i] {
			setLingerZero(l.conn)
		}
		l.conn.Close()
		l.wake()
	}
}

// setLingerZero makes conn's close a reset, which frees what the kernel
// holds for it at once.
func setLingerZero(conn net.Conn) {
	if tc, ok := conn.(interface{ NetConn() net.Conn }); ok {
		conn = tc.NetConn()
	}
	if tcp, ok := conn.(*net.TCPConn); ok {
		tcp.SetLinger(0)
	}
}

// halfClose sends FIN after sluice's last bytes to conn (its close frame):
// the peer then sees the end of the stream and closes its side, which
// sluice reads to the end before closing (no reset).
func halfClose(conn net.Conn) {
	if cw, ok := conn.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

// upstreamFinGrace is how long sluice waits, once the upstream's close
// handshake is done, for the backend to close the TCP connection first
// before sluice half-closes it itself; a backend that waits for the
// client's FIN instead then gets it. Such closes leave TIME_WAIT on
// sluice's side and are counted (sluice_upstream_closed_first_total).
const upstreamFinGrace = 500 * time.Millisecond

// drain reads src once nothing more from it is forwarded (its close
// came, or it broke the protocol): bytes that arrive after that are
// discarded, so that closing the socket later sends no reset. The close
// timer bounds every wait: abort closes the socket under it.
//
// The client leg is read until its close handshake is done (sluice is
// the server and closes TCP first, as RFC 6455 §7.1.1 has it) or, when
// its close reply is not awaited, until the client's FIN. The upstream
// leg is read until the backend's FIN, so that the backend closes first.
func (s *session) drain(src *leg) (clean bool) {
	if src.upstream {
		return s.drainUpstream(src)
	}
	for {
		s.mu.Lock()
		done := src.closeSent && src.closeRcvd
		src.draining = !done
		s.mu.Unlock()
		if done {
			return true
		}
		src.conn.SetReadDeadline(time.Now().Add(s.srv.opts.CloseTimeout))
		err := src.rd.Drain()
		if err == nil {
			return true // the client's FIN
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			return false
		}
		s.mu.Lock()
		woken := src.closeSent && src.closeRcvd
		s.mu.Unlock()
		if !woken {
			return false
		}
		// closeWritten moved the deadline to wake this reader: done.
	}
}

// drainUpstream waits for the backend's FIN; once the close handshake is
// done and upstreamFinGrace has passed without it, sluice half-closes
// first and waits on.
func (s *session) drainUpstream(src *leg) (clean bool) {
	for {
		src.conn.SetReadDeadline(time.Now().Add(upstreamFinGrace))
		err := src.rd.Drain()
		if err == nil {
			return true
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			return false
		}
		s.mu.Lock()
		done, aborted := src.closeSent && src.closeRcvd, s.aborted
		s.mu.Unlock()
		if aborted {
			return false
		}
		if done {
			s.srv.metrics.upstreamClosedFirst.Inc()
			halfClose(src.conn)
			src.conn.SetReadDeadline(time.Now().Add(s.srv.opts.CloseTimeout))
			return src.rd.Drain() == nil
		}
	}
}

// readerEnded records that nobody reads src's socket any more; clean
// says it was read to its end (or its close handshake is done). A leg
// whose handshake is over closes at once, without waiting for the other
// leg: reset if it did not end cleanly, so that a client that stopped
// reading does not keep what the kernel holds for it.
func (s *session) readerEnded(src *leg, clean bool) {
	s.mu.Lock()
	src.readDone = true
	if src.finished() {
		s.doom(src, !clean && !src.upstream)
	}
	s.checkDoneLocked()
	s.unlock()
}
