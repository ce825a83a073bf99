package proxy

import (
	"errors"
	"math"
	"os"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// frameWatch enforces Options.FrameReadTimeout on a session's client leg.
// Between frames a client may idle (keepalive deals with idle clients);
// once a frame has started arriving, its header and payload must arrive
// within the timeout. The client's reader marks frames with frameStart and
// frameEnd: an atomic store or two and, at most once per frame, a clock
// read; the timer is re-armed only when it fires, not per frame.
type frameWatch struct {
	// started is when the current frame began, as ns since the session
	// began, plus one; 0 between frames. Written by the client's reader,
	// and moved forward by the timer while the upstream holds sluice back.
	started   atomic.Int64
	streaming atomic.Bool // the frame's payload is spliced by the upstream writer
	throttled atomic.Bool // the client's reader waits out an inbound limit
	armed     atomic.Bool // the timer is set
	timer     atomic.Pointer[time.Timer]
}

// frameTimeout is the leg's frame read timeout; 0 when there is none
// (always for the upstream, which is trusted).
func (l *leg) frameTimeout() time.Duration {
	if l.upstream {
		return 0
	}
	return l.s.srv.opts.FrameReadTimeout
}

// frameStart: the reader has read header h; from here the frame must
// arrive whole within the timeout. Only the leg's reader calls it.
func (l *leg) frameStart(h ws.Header) {
	d := l.frameTimeout()
	if d <= 0 {
		return
	}
	w := &l.s.frames
	w.streaming.Store(!h.OpCode.IsControl() && h.Length > inlineMax)
	if w.started.Load() != 0 {
		return // it started in frameEnd, already buffered
	}
	if h.Length <= int64(l.rd.Buffered()) {
		// Already here whole (a pong, a small message): nothing to wait
		// for. An idle client's only frames are its pongs, so its session
		// never makes the timer (a time.Timer per session) nor wakes for
		// it FrameReadTimeout later.
		return
	}
	l.watchFrom(d)
}

// frameEnd: the reader is done with a frame and about to read the next
// header. Bytes of it already buffered mean the next frame has started;
// otherwise the client may now idle. Only the leg's reader calls it.
func (l *leg) frameEnd() {
	d := l.frameTimeout()
	if d <= 0 {
		return
	}
	w := &l.s.frames
	w.streaming.Store(false)
	if l.rd.Buffered() > 0 {
		l.watchFrom(d)
	} else {
		w.end()
	}
}

// watchFrom starts the clock for a frame now and sets the timer if it is
// not set already.
func (l *leg) watchFrom(d time.Duration) {
	w := &l.s.frames
	if !w.begin(l.s.age()) {
		return
	}
	if t := w.timer.Load(); t != nil {
		t.Reset(d)
		return
	}
	// Made stopped, stored, then set: the callback always finds it.
	t := time.AfterFunc(math.MaxInt64, l.s.frameTimerFired)
	w.timer.Store(t)
	t.Reset(d)
}

// begin starts the clock of a frame at now (since the session began) and
// reports whether the caller must set the timer.
func (w *frameWatch) begin(now time.Duration) (arm bool) {
	w.started.Store(int64(now) + 1)
	return !w.armed.Load() && w.armed.CompareAndSwap(false, true)
}

// end: no frame is arriving; the client may idle.
func (w *frameWatch) end() { w.started.Store(0) }

// check runs when the timer fires, at now (since the session began), and
// reports whether the current frame is overdue; if a frame is arriving
// but not overdue, it re-arms the timer for its deadline. held says that
// sluice itself is holding the client back (its frames toward the
// upstream are queued): the time does not count then, and the frame's
// clock restarts.
func (w *frameWatch) check(now, timeout time.Duration, held bool) (overdue bool) {
	w.armed.Store(false)
	st := w.started.Load()
	if st == 0 {
		return false // idle: the next frame re-arms
	}
	if held {
		w.started.CompareAndSwap(st, int64(now)+1)
		w.rearm(timeout)
		return false
	}
	if left := time.Duration(st-1) + timeout - now; left > 0 {
		w.rearm(left)
		return false
	}
	return true
}

func (w *frameWatch) rearm(d time.Duration) {
	if w.armed.CompareAndSwap(false, true) {
		w.timer.Load().Reset(d)
	}
}

// stop ends the watch for good; Server.forget calls it.
func (w *frameWatch) stop() {
	if t := w.timer.Load(); t != nil {
		t.Stop()
	}
}

// upstreamFrameStart: the upstream's reader has read header h. A payload
// not here whole must keep arriving within UpstreamFrameReadTimeout: a
// read deadline, set only then (a frame read whole costs nothing), and
// only for a payload the reader reads itself; a spliced one gets its own
// deadline per chunk from the writer (stream), once its turn has come.
func (l *leg) upstreamFrameStart(h ws.Header) {
	d := l.s.srv.opts.UpstreamFrameReadTimeout
	if d <= 0 || h.Length <= int64(l.rd.Buffered()) || (!h.OpCode.IsControl() && h.Length > inlineMax) {
		return
	}
	l.setReadDeadline(time.Now().Add(d))
	l.frameDeadline = true
}

// upstreamFrameEnd lifts upstreamFrameStart's deadline: between frames
// the backend may idle.
func (l *leg) upstreamFrameEnd() {
	if l.frameDeadline {
		l.frameDeadline = false
		l.setReadDeadline(time.Time{})
	}
}

// readDeadlinePassed reports whether l's read deadline has passed, so
// that a failed splice from l can tell its cause from the writing side's.
// RawConn.Read checks the deadline before it calls f.
func (l *leg) readDeadlinePassed() bool {
	raw := l.rd.RawConn()
	return raw != nil && errors.Is(raw.Read(func(uintptr) bool { return true }), os.ErrDeadlineExceeded)
}

// frameTimerFired is the frame watch's timer callback.
func (s *session) frameTimerFired() {
	defer s.recoverTimer()
	held := s.upstream.queuedBytes() > 0 || s.frames.throttled.Load()
	if !s.frames.check(s.age(), s.srv.opts.FrameReadTimeout, held) {
		return
	}
	s.mu.Lock()
	ending := s.endNote != noteNone || s.aborted
	s.mu.Unlock()
	if ending {
		return // closing for another reason already (client gone mid-frame, ...)
	}
	// Evicted: 1001 to the upstream, 1013 to the client after what the
	// upstream sends until it answers (close.go). A frame being spliced to
	// the upstream is torn and no close frame can follow it there: failing
	// the client's socket for reads ends the splice, and the upstream
	// connection is cut.
	s.end(causeReadTimeout, nil)
	if s.frames.streaming.Load() {
		s.client.setReadDeadline(time.Now())
	}
}
