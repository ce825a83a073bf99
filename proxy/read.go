package proxy

// The life of a frame, from one socket to the other:
//
//  1. A leg's reader (read, pump) waits for its socket to be readable
//     (quiet, in frame.Reader.Serve); a socket quiet for idleGrace parks
//     in the server's epoll set instead (idle_linux.go) and its goroutine
//     ends; readability starts a reader again (wake).
//  2. Whole frames that arrive are forwarded from inside the wait (Frames);
//     the start of one not here whole goes back to pump, which reads the
//     rest. Either way the reader reads the frame's header and, in frame,
//     checks it (frame.Checker: RFC 6455 rules and size limits), holds a
//     client to its inbound limits (ratelimit.go) and starts the frame
//     watchdog (frameWatch, below).
//  3. A control frame is read whole: a close goes to the close state
//     machine (close.go); a ping or pong is queued on the other leg's
//     priority lane, the reader waiting while the lane is full.
//  4. A data frame up to inlineMax is read into a pooled segment; a larger
//     one queues only its header, with Follow set to its payload length.
//  5. The segment goes on the other leg's queue (limiter.Queue.Push):
//     the queue's policy may refuse it (evict), drop older messages, or
//     make the reader wait (pause). Unless another holds the other leg's
//     write token, the reader then writes that queue itself with one
//     non-blocking writev (legWriter.flush, write.go), and starts a writer
//     goroutine only for what the socket does not take at once or a
//     streamed payload.
//  6. A writer takes a batch, control frames first, and writes it with
//     one writev under a deadline; a Follow segment's payload is then
//     spliced from the reader's socket (stream), and the reader, which
//     waited on streamDone, goes on with the next frame.

import (
	"errors"
	"math"
	"os"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"

	"github.com/sluice-proxy/sluice/frame"
	"github.com/sluice-proxy/sluice/limiter"
)

// startReading parks the new leg at once when nothing of it is buffered
// yet (the arming reports bytes already on the socket), sparing a
// goroutine that would only find the socket empty; otherwise, or without
// the epoll set, its reader starts.
func (l *leg) startReading() {
	if l.rd.Buffered() == 0 && l.s.srv.idle.park(l) {
		return
	}
	go l.reader()
}

// inlineMax is the largest payload copied into a queued segment; larger
// frames are streamed from socket to socket (spliced) without a copy in
// user space.
const inlineMax = frame.MaxPooled - frame.MaxHeaderSize

// Role names for stack dumps.
func (s *session) clientReader()   { s.read(&s.client, &s.upstream, idleGrace) }
func (s *session) upstreamReader() { s.read(&s.upstream, &s.client, idleGrace) }

// firstClientReader is the client's reader in the handshake's goroutine
// (serveConn). Its first wait is shorter: the goroutine holds the stack
// the handshake grew (about 10 KiB), and in a burst of new connections
// every waiting reader holds one such stack, so the wait is what the
// burst costs in RSS per connection (PERFORMANCE.md).
func (s *session) firstClientReader() { s.read(&s.client, &s.upstream, firstGrace) }

// firstGrace is how long the handshake's goroutine waits for the client's
// first frame before it parks. A client on loopback or a LAN that speaks
// as soon as it has its 101 (a subscription, or a short session's close)
// does so well within it, and then needs no epoll_ctl and no goroutine of
// its own; a slower one parks and is woken as any idle leg is.
const firstGrace = 50 * time.Millisecond

// read runs src's reader: it forwards frames until src parks, ends or is
// lost. A reader that parks hands its place in the running count to the
// next one; one whose peer has finished reads the socket to its end.
// grace is the first wait's idleGrace.
func (s *session) read(src, dst *leg, grace time.Duration) {
	pumping := true
	defer func() {
		if p := recover(); p != nil {
			// The reader ends as if its socket had: it never reads
			// again, and the session ends with 1011 to the client.
			s.recovered("reader", p)
			if pumping {
				s.readerEnded(src, false)
				s.exit()
			}
		}
	}()
	clean := false
	switch s.pump(src, dst, grace) {
	case readerParked:
		return
	case readerDraining:
		clean = s.drain(src)
	}
	pumping = false
	s.readerEnded(src, clean)
	s.exit()
}

// How pump ends, and how each frame it forwards does.
const (
	readerNext     = iota // go on with the next frame
	readerPonged          // go on, and park at once if src's socket is empty: it answered sluice's ping
	readerParked          // src's socket is in the epoll set
	readerDraining        // nothing more from src is forwarded: read it to its end
	readerLost            // src's socket failed or was closed
)

// idleGrace is how long a reader whose socket has gone quiet keeps
// waiting in its goroutine before it parks. A socket with bytes at least
// this often (a live feed) never pays for parking and waking again (an
// epoll_ctl and a goroutine start per message), while one quiet for
// longer (an idle client between keepalive pings) gives its goroutine up.
const idleGrace = time.Second

// maxQuietWait bounds the doubling waits of a socket that keeps bringing
// data (quiet): a feed that stops parks within twice this.
const maxQuietWait = 8 * time.Second

// quiet is called between frames, with nothing buffered, by the reader
// of a socket with a file descriptor. It waits for the socket in Serve,
// which forwards the whole frames that arrive (Frames), and returns
// readerNext with the start of a frame left buffered for the pump, or
// how a frame ended the reading, or readerParked once the socket stayed
// quiet for grace (idleGrace, or firstGrace for a session's first wait),
// or at once when now is set (src.raw, the epoll set, makes parking
// possible at all).
//
// now is set after a pong answering sluice's own ping: that is how an idle
// peer speaks, once per keepalive interval, and waiting out the grace
// after it would keep a goroutine, its stack and a deadline timer busy
// for a second per ping, for a socket that almost always parks anyway.
//
// The grace is a read deadline set when the wait begins, not per frame:
// when it passes, a socket that brought data meanwhile waits again, for
// twice as long up to maxQuietWait, and a socket parks once a whole wait
// passes with nothing: a busy one pays for a deadline once per wait, not
// twice per wake-up, and a quiet one parks after one to two graces.
func (s *session) quiet(src *leg, now bool, grace time.Duration) (next int, err error) {
	if src.raw == nil {
		// Parking is off: wait with no deadline.
		src.served = readerNext
		err := src.rd.Serve(src)
		return int(src.served), err
	}
	if now {
		idle, err := src.rd.Idle()
		if err != nil || !idle {
			return readerNext, err
		}
		if s.srv.idle.park(src) {
			return readerParked, nil
		}
		return readerNext, nil
	}
	for {
		seen := src.bytesIn
		src.setReadDeadline(time.Now().Add(grace))
		src.served = readerNext
		err = src.rd.Serve(src)
		if err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
			src.setReadDeadline(time.Time{})
			return int(src.served), err
		}
		if src.bytesIn == seen {
			break
		}
		if h := s.srv.opts.waitAgainHook; h != nil {
			h(src.upstream)
		}
		// Data came within the wait: wait again, twice as long up to
		// maxQuietWait, so that a slow feed (a message a second) costs a
		// deadline that passes once in several messages, not one per
		// message; it parks after one whole wait with nothing.
		grace = min(2*max(grace, idleGrace/2), maxQuietWait)
	}
	src.setReadDeadline(time.Time{})
	if s.srv.idle.park(src) {
		return readerParked, nil
	}
	return readerNext, nil
}

// wake starts l's reader if it is parked.
func (l *leg) wake() {
	if l.parked.CompareAndSwap(true, false) {
		go l.reader()
	}
}

// pump reads frames from src, checks them and queues them for dst's
// writer. When it returns readerParked, src's socket is in the epoll set
// and the goroutine must end without touching the session again.
func (s *session) pump(src, dst *leg, grace time.Duration) int {
	var scratch controlScratch
	ponged := false
	for {
		src.frameEnd() // frame read timeout (frameWatch): idle between frames is fine
		src.upstreamFrameEnd()
		if src.rd.RawConn() != nil && src.rd.Buffered() == 0 {
			// Whole frames are forwarded inside the wait (Frames); it
			// returns with the start of one it leaves to the code below.
			next, err := s.quiet(src, ponged, grace)
			grace = idleGrace
			if err != nil {
				s.lost(src, err)
				return readerLost
			}
			ponged = next == readerPonged
			if ponged {
				continue
			}
			if next != readerNext {
				return next
			}
			if src.rd.Buffered() == 0 {
				continue
			}
			src.frameEnd() // a frame has started arriving: its clock runs
		}
		h, raw, err := src.rd.ReadHeader()
		if err != nil {
			var fe *frame.Error
			if errors.As(err, &fe) {
				s.violation(src, fe)
				return readerDraining
			}
			s.lost(src, err)
			return readerLost
		}
		next := s.frame(src, dst, h, raw, &scratch)
		ponged = next == readerPonged
		if next != readerNext && !ponged {
			return next
		}
	}
}

// Frames is src's reader while it waits in Serve (frame.Sink): it
// forwards every whole frame the socket's last read brought, and stops at
// the start of one not here whole, or larger than inlineMax (those are the
// pump's: they wait for the socket), and when a frame ends the reading
// (readerDraining, readerLost) or asks to park (readerPonged); quiet
// returns that answer (served).
func (l *leg) Frames() bool {
	var scratch controlScratch
	s, dst := l.s, l.peer()
	for l.rd.Whole(inlineMax) {
		h, raw, err := l.rd.ReadHeader()
		if err != nil { // never for a whole frame; the pump reports it
			return false
		}
		if next := s.frame(l, dst, h, raw, &scratch); next != readerNext {
			l.served = int8(next)
			return false
		}
	}
	return l.rd.Buffered() == 0
}

// frame checks the frame whose header h src's reader has just read (raw,
// as it came) and hands it on to dst: a control frame whole, a data frame
// into dst's queue. It returns how the reader goes on.
func (s *session) frame(src, dst *leg, h ws.Header, raw []byte, scratch *controlScratch) int {
	if err := src.check.Check(h); err != nil {
		s.violation(src, err.(*frame.Error))
		return readerDraining
	}
	if s.srv.opts.panicHook != nil {
		s.testPanic("reader")
	}
	if !src.upstream && s.rate != nil {
		// Inbound limits (ratelimit.go): may wait, or end the session.
		if next := s.admit(src, h); next != readerNext {
			return next
		}
	}
	src.frameStart(h) // the frame must now arrive whole within FrameReadTimeout
	if src.upstream {
		src.upstreamFrameStart(h) // ... or keep arriving within UpstreamFrameReadTimeout
	}
	if src.ka != nil {
		src.ka.Heard()
	}
	switch {
	case h.OpCode.IsControl():
		return s.forwardControl(src, dst, h, raw, scratch)
	case src.skipRest:
		// The rest of a message whose start was refused: a
		// continuation alone would be a protocol error at dst.
		src.skipRest = !h.Fin
		if err := src.rd.Discard(h.Length); err != nil {
			s.lost(src, err)
			return readerLost
		}
		return readerNext
	}
	dir := toUpstream
	if src.upstream {
		dir = toClient
	}
	if h.Fin {
		s.srv.metrics.messages[dir].Inc()
	}
	s.srv.metrics.bytes[dir].Add(float64(int64(len(raw)) + h.Length))
	return s.forwardData(src, dst, h, raw)
}

// controlScratch holds a control frame as it came and its unmasked
// payload, on the reader's stack. A peer may encode a control frame's
// length in 16 or 64 bits: room for the longest header, not the shortest.
type controlScratch struct {
	wire    [frame.MaxHeaderSize + ws.MaxControlFramePayloadSize]byte
	payload [ws.MaxControlFramePayloadSize]byte
}

// forwardControl reads the rest of a control frame whose header is raw and
// hands it on: a close to the close state machine, sluice's own pong to
// the keepalive (readerPonged), anything else to dst's priority lane.
func (s *session) forwardControl(src, dst *leg, h ws.Header, raw []byte, sc *controlScratch) int {
	n := copy(sc.wire[:], raw)
	wire := sc.wire[:n+int(h.Length)]
	if err := src.rd.ReadSmall(wire[n:]); err != nil {
		s.lost(src, err)
		return readerLost
	}
	payload := sc.payload[:h.Length]
	copy(payload, wire[n:])
	if h.Masked {
		ws.Cipher(payload, h.Mask, 0)
	}
	switch h.OpCode {
	case ws.OpClose:
		s.closeReceived(src, dst, payload, wire)
		return readerDraining
	case ws.OpPong:
		if src.ka != nil && src.ka.IsOwnPong(payload) {
			return readerPonged
		}
	}
	// A full priority lane makes this reader wait: a peer's ping or pong
	// is never dropped. It fails only once dst is closing.
	seg := limiter.NewSegment(len(wire))
	*seg.Buf = append(*seg.Buf, wire...)
	if dst.queue().PushControl(seg) != nil {
		seg.Free()
		return readerNext
	}
	dst.w.flush()
	return readerNext
}

// forwardData reads a data frame whose header is raw into a segment, or,
// past inlineMax, queues the header alone and waits while dst's writer
// splices the payload, and queues it for dst.
func (s *session) forwardData(src, dst *leg, h ws.Header, raw []byte) int {
	size := int64(len(raw)) + h.Length
	var seg *limiter.Segment
	if h.Length <= inlineMax {
		seg = limiter.NewSegment(int(size))
		b := append(*seg.Buf, raw...)
		b = b[:size]
		if err := src.rd.ReadFull(b[len(raw):]); err != nil {
			seg.Free()
			s.lost(src, err)
			return readerLost
		}
		*seg.Buf = b
	} else {
		seg = limiter.NewSegment(len(raw))
		*seg.Buf = append(*seg.Buf, raw...)
		seg.Follow = h.Length
		if dst.w.streamDone == nil {
			// Made for the first streamed frame only: most sessions never
			// stream.
			dst.w.streamDone = make(chan error, 1)
		}
		seg.Discarded = dst.w.streamDone
	}
	seg.Start = h.OpCode != ws.OpContinuation
	seg.End = h.Fin
	follow := seg.Follow
	src.bytesIn += uint64(size)
	if h.Fin {
		src.msgsIn++
	}
	err := dst.queue().Push(seg)
	switch err {
	case nil:
		dst.w.flush()
		if follow == 0 {
			return readerNext
		}
		// dst's writer copies the payload straight from src's socket; src
		// is not read until it is done.
		switch err := <-dst.w.streamDone; err {
		case nil:
			return readerNext
		case limiter.ErrClosed:
			// Discarded unwritten: skip the payload below.
		default:
			// The copy broke mid-frame: src's stream has no frame boundary
			// left to read at, so its close reply cannot be awaited either.
			s.mu.Lock()
			src.end.step(evNoReply)
			s.checkDoneLocked()
			s.unlock()
			return readerDraining
		}
	case limiter.ErrOverflow:
		s.end(causeSlow, nil)
	case limiter.ErrPauseTimeout:
		if dst.upstream {
			// The client waited that long for its backend to take bytes.
			s.end(causeUpstreamWriteTimeout, nil)
		} else {
			s.end(causePauseTimeout, nil)
		}
	}
	// The frame has nowhere to go: dst is closing. Keep reading src until
	// its close frame answers ours.
	if err != nil {
		src.skipRest = !seg.End
		seg.Free()
	}
	if follow > 0 {
		if err := src.rd.Discard(follow); err != nil {
			s.lost(src, err)
			return readerLost
		}
	}
	return readerNext
}

// --- The frame read timeouts: a frame once started must arrive whole. ---
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
