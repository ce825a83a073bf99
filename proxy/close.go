package proxy

// Ending a session. A session ends in one of two ways: a peer closes (its
// close frame is relayed as it came, and the other side's reply relayed
// back), or sluice ends it for a cause of its own (endings.go: one table
// of causes says what each leg is told and when; end is the one path that
// counts, logs and queues both close frames). This file carries the close
// frames out and ends both TCP connections.
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
	"os"
	"time"

	"github.com/gobwas/ws"

	"github.com/sluice-proxy/sluice/frame"
	"github.com/sluice-proxy/sluice/limiter"
)

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
	src.end.step(evCloseReceived)
	src.rcvdCode = code
	if src.ka != nil {
		// It said goodbye: silence from now on is not staleness.
		src.ka.Stop()
	}
	s.noteEnd(src.note(noteClientClosed, noteUpstreamClosed), "")
	switch {
	case dst.end.out == outHeld:
		// The upstream answered the close sluice sent it: the client's
		// own close may go now, behind everything before it.
		s.closeLeg(dst, s.hold.code, s.hold.text, false)
	case dst.end.out == outNone && !dst.end.lost():
		// Pass the close on as it came: same code, same reason, same mask.
		seg := limiter.NewSegment(len(wire))
		*seg.Buf = append(*seg.Buf, wire...)
		s.queueClose(dst, seg, code, false)
	}
	if (src.end.out == outNone || src.end.out == outHeld) && dst.end.lost() {
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
	if l.end.lost() || !l.queue().PushClose(seg, first) {
		seg.Free()
		return
	}
	l.flushWanted = true
	l.end.step(evCloseQueued)
	l.sentCode = code
	s.armCloseTimerLocked()
}

// closeLeg queues a close frame that sluice originates toward l. A close
// held for the client (holdClientClose) takes the place of any other.
// Callers hold s.mu.
func (s *session) closeLeg(l *leg, code ws.StatusCode, reason string, first bool) {
	if l.end.out == outHeld {
		s.hold.timer.Stop()
		code, reason = s.hold.code, s.hold.text
	}
	if l.end.lost() {
		return
	}
	if l.end.out == outQueued || l.end.out == outWritten {
		if first {
			// Let the queued close overtake the data.
			l.queue().Expedite()
			l.flushWanted = true
		}
		return
	}
	s.queueClose(l, closeSegment(code, reason, l.upstream), code, first)
}

func (s *session) armCloseTimerLocked() {
	if s.closeTimer == nil && !s.aborted {
		s.closeTimer = time.AfterFunc(s.srv.opts.CloseTimeout, func() { s.abort(noteCloseTimeout) })
	}
}

// closeWritten: the writer put dst's close frame on the wire.
func (s *session) closeWritten(dst *leg) {
	s.mu.Lock()
	defer s.unlock()
	if s.aborted {
		// Written by a flush from an uncounted goroutine (a timer, the
		// guard) after the session finished: nothing is left to count.
		return
	}
	dst.end.step(evCloseWritten)
	s.srv.metrics.closeCode(dst.upstream, true, dst.sentCode).Inc()
	if dst.end.read == readDraining && dst.end.in == inReceived {
		// The handshake is done: wake the client's reader from its drain.
		dst.setReadDeadline(time.Now())
	}
	s.checkDoneLocked()
}

// checkDoneLocked ends the session once both legs have finished their
// close handshakes and both sockets have been read to their end. Callers
// hold s.mu.
func (s *session) checkDoneLocked() {
	if s.client.finished() && s.upstream.finished() && s.client.end.read == readDone && s.upstream.end.read == readDone {
		s.abortLocked()
	}
}

// noteEnd records what first began the session's end, with its error or
// violation if any. Callers hold s.mu.
func (s *session) noteEnd(n endNote, detail string) {
	if s.endNote == noteNone {
		s.endNote, s.endDetail = n, detail
	}
}

// lost: src's socket failed or ended without a close frame. Called by
// src's reader.
func (s *session) lost(src *leg, err error) {
	if src.frameDeadline && errors.Is(err, os.ErrDeadlineExceeded) {
		// The upstream stopped in the middle of a frame.
		s.end(causeUpstreamFrameTimeout, nil)
	}
	s.mu.Lock()
	if s.aborted {
		s.unlock()
		return
	}
	src.end.step(evLost)
	s.doom(src, false)
	if src.ka != nil {
		src.ka.Stop()
	}
	if src.end.in == inReceived {
		// It closed properly before: the socket ending is expected.
		s.checkDoneLocked()
		s.unlock()
		return
	}
	s.noteEnd(src.note(noteClientLost, noteUpstreamLost), errString(err))
	s.unlock()
	s.endLost(src)
}

// endLost ends the session because l's socket is gone.
func (s *session) endLost(l *leg) {
	if l.upstream {
		s.end(causeUpstreamLost, nil)
	} else {
		s.end(causeClientLost, nil)
	}
}

// writeFailed: a write to dst failed or timed out.
func (s *session) writeFailed(dst *leg, err error) {
	timeout := errors.Is(err, os.ErrDeadlineExceeded)
	switch {
	case errors.Is(err, errUpstreamStalled):
		// The client's frame is torn: it can have no close frame. Nor
		// can the upstream, whose stream has no frame boundary left:
		// its socket goes too, reset, as its backend is wedged.
		s.mu.Lock()
		dst.end.step(evLost) // no close is queued for it
		s.upstream.end.step(evLost)
		s.doom(&s.upstream, true)
		s.unlock()
		s.end(causeUpstreamFrameTimeout, nil)
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
	dst.end.step(evLost)
	dst.queue().Close()
	// A client that stopped reading would keep what the kernel holds for
	// it in an orphaned socket for minutes: reset it instead; so too a
	// backend that stopped reading.
	s.doom(dst, !dst.upstream || timeout)
	s.noteEnd(dst.note(noteClientWriteFailed, noteUpstreamWriteFailed), errString(err))
	s.unlock()
	s.endLost(dst)
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
	if s.ended != nil {
		close(s.ended)
	}
	for _, l := range []*leg{&s.client, &s.upstream} {
		if l.ka != nil {
			l.ka.Stop()
		}
		// An upstream socket still holding bytes its backend has not
		// taken is reset too: an orphan would keep them.
		unsent := l.queue().Unsent() > 0
		l.queue().Close()
		s.doom(l, (!l.upstream && l.end.read != readDone) || (l.upstream && unsent))
	}
}

// doom marks l's socket to be closed, reset first if reset is set, when
// s.mu is let go (unlock): a close can write (TLS close_notify), and no
// network I/O happens under a lock. Callers hold s.mu.
func (s *session) doom(l *leg, reset bool) {
	if reset {
		l.end.step(evDoomReset)
	} else {
		l.end.step(evDoom)
	}
}

// unlock lets go of s.mu, then closes the sockets doomed meanwhile, and
// wakes their parked readers to find them closed and end; then it writes
// the close frames queued meanwhile (flush), which nothing may do under
// s.mu: a close written whole is acknowledged under it (closeWritten).
func (s *session) unlock() {
	var close, flush [2]*leg
	var reset [2]bool
	for i, l := range []*leg{&s.client, &s.upstream} {
		if st := l.end.sock; st == sockDoomed || st == sockDoomedReset {
			close[i], reset[i] = l, st == sockDoomedReset
			l.end.step(evSocketClosed)
		}
		if l.flushWanted {
			l.flushWanted = false
			flush[i] = l
		}
	}
	s.mu.Unlock()
	for i, l := range close {
		if l == nil {
			continue
		}
		l.w.closeSocket(reset[i])
		l.wake()
	}
	for _, l := range flush {
		if l != nil {
			l.w.flush()
		}
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
		done := src.end.closeHandshakeDone()
		if !done {
			src.end.step(evDrain)
		}
		s.mu.Unlock()
		if done {
			return true
		}
		src.setReadDeadline(time.Now().Add(s.srv.opts.CloseTimeout))
		err := src.rd.Drain()
		if err == nil {
			return true // the client's FIN
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			return false
		}
		s.mu.Lock()
		woken := src.end.closeHandshakeDone()
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
		src.setReadDeadline(time.Now().Add(upstreamFinGrace))
		err := src.rd.Drain()
		if err == nil {
			return true
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			return false
		}
		s.mu.Lock()
		done, aborted := src.end.closeHandshakeDone(), s.aborted
		s.mu.Unlock()
		if aborted {
			return false
		}
		if done {
			s.srv.metrics.upstreamClosedFirst.Inc()
			src.w.halfClose()
			src.setReadDeadline(time.Now().Add(s.srv.opts.CloseTimeout))
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
	src.end.step(evReaderEnded)
	if src.finished() {
		s.doom(src, !clean && !src.upstream)
	}
	s.checkDoneLocked()
	s.unlock()
}

// A leg's ending, as named states: how far sluice's close toward the leg
// has gone (closeOut), what the leg's peer has said (closeIn), how far its
// reader is (readState), whether its socket still carries anything
// (linkState) and how far the socket is closed (sockState). Each moves only by the
// events below, through one table (legSteps); the code above and
// endings.go decide which event happens, from the session's cause.
// All of it is guarded by s.mu.

// closeOut is how far the close frame toward a leg has gone.
type closeOut uint8

const (
	outNone    closeOut = iota // no close queued toward the leg
	outHeld                    // decided, held back until the other leg has answered (holdClientClose)
	outQueued                  // queued (or moved ahead of the data)
	outWritten                 // on the wire
)

// closeIn is what the leg's peer has said of the end.
type closeIn uint8

const (
	inAwaited    closeIn = iota // its close frame is awaited
	inNotAwaited                // it broke the protocol or does not read: its close is not awaited
	inReceived                  // it sent its close frame
)

// readState is how far the leg's reader is.
type readState uint8

const (
	reading      readState = iota // frames are read and forwarded
	readDraining                  // read only to find the socket's end (close.go drain)
	readDone                      // no reader will read the socket again
)

// linkState is whether the leg's socket still carries anything.
type linkState uint8

const (
	linkUp   linkState = iota
	linkLost           // the socket failed: nothing more goes either way
)

// sockState is how far the leg's socket is in its ending.
type sockState uint8

const (
	sockOpen        sockState = iota
	sockDoomed                // to be closed when s.mu is let go (unlock)
	sockDoomedReset           // ... with a reset (SO_LINGER 0)
	sockClosed                // closed
)

// legEvent is what happens to a leg as its session ends.
type legEvent uint8

const (
	evCloseHeld     legEvent = iota // sluice decided its close toward the leg, and holds it back
	evCloseQueued                   // sluice queued its close toward the leg
	evCloseWritten                  // ... and wrote it
	evCloseReceived                 // the peer's close frame arrived
	evNoReply                       // the peer's close is not to be awaited
	evDrain                         // the reader forwards nothing more, reads to the end
	evReaderEnded                   // no reader will read the socket again
	evDoom                          // close the socket at unlock
	evDoomReset                     // ... with a reset
	evSocketClosed                  // unlock closed it
	evLost                          // a read or write of the socket failed
	numLegEvents
)

// legState is a leg's ending: one state per part.
type legState struct {
	out  closeOut
	in   closeIn
	read readState
	link linkState
	sock sockState
}

// legStep is one row of legSteps: the part an event moves and, per state
// of that part, the next. A state an event does not move maps to itself.
type legStep struct {
	out  [4]closeOut
	in   [3]closeIn
	read [3]readState
	link [2]linkState
	sock [4]sockState
}

// same is the row of an event that moves nothing in a part.
var (
	sameOut  = [4]closeOut{outNone, outHeld, outQueued, outWritten}
	sameIn   = [3]closeIn{inAwaited, inNotAwaited, inReceived}
	sameRead = [3]readState{reading, readDraining, readDone}
	sameLink = [2]linkState{linkUp, linkLost}
	sameSock = [4]sockState{sockOpen, sockDoomed, sockDoomedReset, sockClosed}
)

// legSteps is every transition of a leg's ending.
var legSteps = [numLegEvents]legStep{
	evCloseHeld:    {out: [4]closeOut{outHeld, outHeld, outQueued, outWritten}, in: sameIn, read: sameRead, link: sameLink, sock: sameSock},
	evCloseQueued:  {out: [4]closeOut{outQueued, outQueued, outQueued, outWritten}, in: sameIn, read: sameRead, link: sameLink, sock: sameSock},
	evCloseWritten: {out: [4]closeOut{outNone, outHeld, outWritten, outWritten}, in: sameIn, read: sameRead, link: sameLink, sock: sameSock},
	// A close received stands: the peer has said its last word either way.
	evCloseReceived: {out: sameOut, in: [3]closeIn{inReceived, inReceived, inReceived}, read: sameRead, link: sameLink, sock: sameSock},
	evNoReply:       {out: sameOut, in: [3]closeIn{inNotAwaited, inNotAwaited, inReceived}, read: sameRead, link: sameLink, sock: sameSock},
	evDrain:         {out: sameOut, in: sameIn, read: [3]readState{readDraining, readDraining, readDone}, link: sameLink, sock: sameSock},
	evReaderEnded:   {out: sameOut, in: sameIn, read: [3]readState{readDone, readDone, readDone}, link: sameLink, sock: sameSock},
	evDoom:          {out: sameOut, in: sameIn, read: sameRead, link: sameLink, sock: [4]sockState{sockDoomed, sockDoomed, sockDoomedReset, sockClosed}},
	evDoomReset:     {out: sameOut, in: sameIn, read: sameRead, link: sameLink, sock: [4]sockState{sockDoomedReset, sockDoomedReset, sockDoomedReset, sockClosed}},
	// Only a doomed socket is closed (unlock).
	evSocketClosed: {out: sameOut, in: sameIn, read: sameRead, link: sameLink, sock: [4]sockState{sockOpen, sockClosed, sockClosed, sockClosed}},
	// Lost stands: a socket that failed carries nothing again.
	evLost: {out: sameOut, in: sameIn, read: sameRead, link: [2]linkState{linkLost, linkLost}, sock: sameSock},
}

// step moves the leg's ending by ev. Callers hold s.mu.
func (st *legState) step(ev legEvent) {
	t := &legSteps[ev]
	st.out, st.in, st.read, st.link, st.sock = t.out[st.out], t.in[st.in], t.read[st.read], t.link[st.link], t.sock[st.sock]
}

// lost: the leg's socket failed; nothing more goes either way.
func (st legState) lost() bool { return st.link == linkLost }

// closeHandshakeDone: sluice's close is written and the peer's arrived.
func (st legState) closeHandshakeDone() bool { return st.out == outWritten && st.in == inReceived }
