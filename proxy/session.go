package proxy

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gobwas/ws"
	"github.com/rs/zerolog"

	"sluice/frame"
	"sluice/keepalive"
	"sluice/limiter"
)

// inlineMax is the largest payload copied into a queued segment; larger
// frames are streamed from socket to socket (spliced) without a copy in
// user space.
const inlineMax = frame.MaxPooled - frame.MaxHeaderSize

// batchBytes bounds one writev.
const batchBytes = 256 << 10

// upstreamQueue bounds what waits for the upstream's socket: little, since
// the client's reader simply waits (and so pushes back on the client) while
// the upstream is slow to read.
var upstreamQueue = limiter.Config{
	Policy:      limiter.Pause,
	MaxMessages: 8,
	MaxBytes:    256 << 10,
	LowWater:    0.5,
	KeepNewest:  1,
}

// leg is one side of a session: a socket, its reader state, and the queue
// its single writer goroutine drains.
type leg struct {
	s        *session
	upstream bool // the leg toward the backend: frames sluice makes are masked
	conn     net.Conn
	rd       *frame.Reader
	check    frame.Checker      // owned by this leg's reader goroutine
	out      *limiter.Queue     // frames to write to conn
	ka       *keepalive.Monitor // nil when keepalive is off for this leg
	// streamDone carries the result of a streamed payload from this leg's
	// writer to the other leg's reader, which waits for it. Made by that
	// reader before the first streamed frame (most sessions never stream:
	// 128 B saved per leg), and only then given to the queue.
	streamDone chan error

	// Parking (idle_linux.go): a reader whose socket stays quiet between
	// frames for idleGrace ends, leaving the socket in the server's epoll
	// set; the poller starts a reader again when it is readable.
	reader   func()           // this leg's reader goroutine, made once
	raw      syscall.RawConn  // nil: this leg's reader never parks
	pollID   uint64           // the leg's key in the epoll set
	parked   atomic.Bool      // no reader runs; the next is started by wake
	polled   bool             // registered in the epoll set; reader-owned
	arm      func(fd uintptr) // registers for one event, as armOp says; reader-owned
	armOp    int              // EPOLL_CTL_ADD or _MOD; reader-owned
	skipRest bool             // dropping the frames left of a refused message; reader-owned

	// Counted by the reader of this leg, read after it has ended.
	msgsIn, bytesIn uint64

	// Close state (close.go), guarded by s.mu.
	closeQueued  bool // a close frame toward this leg is queued or written
	closeSent    bool // ... and written
	closeRcvd    bool // this leg's peer sent a close frame
	noReply      bool // this leg broke the protocol or does not read: its close is not awaited
	dead         bool // the socket failed: nothing more goes either way
	readDone     bool // no reader will read the socket again
	draining     bool // the reader reads only to find the socket's end (close.go drain)
	doomed       bool // the socket is to be closed when s.mu is let go
	resetOnClose bool // ... with a reset (SO_LINGER 0)
	connClosed   bool // ... and has been
	sentCode     ws.StatusCode
	rcvdCode     ws.StatusCode
}

func (l *leg) name() string {
	if l.upstream {
		return "upstream"
	}
	return "client"
}

// finished: nothing more is expected on this leg. Callers hold s.mu.
func (l *leg) finished() bool {
	return l.dead || (l.closeSent && (l.closeRcvd || l.noReply))
}

// SendPing implements keepalive.Peer: the ping goes on the priority lane.
func (l *leg) SendPing(payload []byte) {
	seg := limiter.NewSegment(frame.MaxControlFrame)
	*seg.Buf = frame.AppendControl(*seg.Buf, ws.OpPing, payload, l.upstream)
	if !l.out.PushPing(seg) {
		seg.Free() // closing, or the last ping is still unwritten
		return
	}
	if l.upstream {
		l.s.srv.metrics.upstreamPingsSent.Inc()
	} else {
		l.s.srv.metrics.pingsSent.Inc()
	}
}

// Stale implements keepalive.Peer: the peer missed its pong deadline.
func (l *leg) Stale() {
	if l.upstream {
		l.s.srv.metrics.upstreamPongMissed.Inc()
		l.s.end(causeUpstreamPongTimeout, nil)
		return
	}
	l.s.end(causePongTimeout, nil)
}

// session is one proxied pair. Up to four goroutines serve it: a reader
// per socket while it has bytes to read, and a writer per socket while
// that socket's queue has work. A reader parked in the epoll set counts as
// running. The last of them to end finishes the session.
type session struct {
	srv        *Server
	id         uint64
	began      time.Time
	clientAddr string
	target     string

	client, upstream leg
	running          atomic.Int32 // goroutines serving the session; 0 once finished
	frames           frameWatch   // client frame read timeout (admission.go)

	mu         sync.Mutex
	closeTimer *time.Timer // bounds the close handshake; guarded by mu
	hold       heldClose   // the client's close, waiting for the upstream's; guarded by mu
	aborted    bool        // guarded by mu
	cause      cause       // why sluice ended the session, if it did; guarded by mu
	endReason  string      // first reason the session began to end; guarded by mu
}

func (s *Server) startSession(clientConn net.Conn, clientPending []byte, upConn net.Conn, upPending []byte, clientAddr, target, protocol string, ext frame.Extension) {
	ss := &session{
		srv:        s,
		id:         s.nextID.Add(1),
		began:      time.Now(),
		clientAddr: clientAddr,
		target:     target,
	}
	ss.client = leg{s: ss, conn: clientConn, rd: frame.NewReader(clientConn, clientPending)}
	ss.upstream = leg{s: ss, upstream: true, conn: upConn, rd: frame.NewReader(upConn, upPending)}
	ss.client.check = frame.Checker{FromClient: true, Extension: ext, MaxFrame: s.opts.MaxFrameBytes, MaxMessage: s.opts.MaxMessageBytes}
	ss.upstream.check = frame.Checker{FromClient: false, Extension: ext}
	ss.client.out = limiter.NewQueue(&s.opts.Queue, s.budget, ss.guardEvict)
	if f := unsentCounter(clientConn); f != nil {
		// What the kernel holds unsent for the client counts as queued:
		// sampled by the Budget's guard, never per frame.
		ss.client.out.OnUnsent(f)
	}
	ss.upstream.out = limiter.NewQueue(&upstreamQueue, s.budget, nil)

	ss.client.reader, ss.upstream.reader = ss.clientReader, ss.upstreamReader
	if s.idle != nil {
		ss.client.pollID, ss.upstream.pollID = ss.id<<1, ss.id<<1|1
		ss.client.raw, ss.upstream.raw = ss.client.rd.RawConn(), ss.upstream.rd.RawConn()
	}
	// Writers run only while their queue has work, readers only while
	// their socket has bytes: an idle session is no goroutine at all.
	// Func values made once: `go ss.clientWriter()` would allocate a
	// closure per start.
	clientWriter, upstreamWriter := ss.clientWriter, ss.upstreamWriter
	ss.client.out.OnWork(func() {
		if ss.enter() {
			go clientWriter()
		}
	})
	ss.upstream.out.OnWork(func() {
		if ss.enter() {
			go upstreamWriter()
		}
	})
	// The readers count as running from here, so that a keepalive ping or
	// a drain can start a writer before they do.
	ss.running.Store(2)
	if s.opts.Keepalive.Interval > 0 {
		ss.client.ka = keepalive.Start(s.opts.Keepalive, &ss.client)
	}
	if s.opts.UpstreamKeepalive.Interval > 0 {
		ss.upstream.ka = keepalive.Start(s.opts.UpstreamKeepalive, &ss.upstream)
	}

	// Fully built: only now may Shutdown see it.
	s.mu.Lock()
	s.sessions[ss] = struct{}{}
	s.mu.Unlock()
	s.metrics.connectionsActive.Inc()
	ss.event(s.log.Info()).Str("upstream", target).Str("protocol", protocol).Msg("session open")
	if s.closing.Load() {
		// Shutdown may have listed the sessions before this one joined.
		ss.goAway()
	}
	ss.client.startReading()
	ss.upstream.startReading()
}

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

// event adds the session's identity to a log line. A per-session
// sub-logger would hold its own buffer for the session's whole life.
func (s *session) event(e *zerolog.Event) *zerolog.Event {
	return e.Uint64("conn", s.id).Str("client", s.clientAddr)
}

// Role names for stack dumps.
func (s *session) clientReader()   { s.read(&s.client, &s.upstream) }
func (s *session) upstreamReader() { s.read(&s.upstream, &s.client) }

// read runs src's reader: it forwards frames until src parks, ends or is
// lost. A reader that parks hands its place in the running count to the
// next one; one whose peer has finished reads the socket to its end.
func (s *session) read(src, dst *leg) {
	clean := false
	switch s.pump(src, dst) {
	case readerParked:
		return
	case readerDraining:
		clean = s.drain(src)
	}
	s.readerEnded(src, clean)
	s.exit()
}

// How pump ends.
const (
	readerParked   = iota // src's socket is in the epoll set
	readerDraining        // nothing more from src is forwarded: read it to its end
	readerLost            // src's socket failed or was closed
)

func (s *session) clientWriter()   { defer s.exit(); s.write(&s.client, &s.upstream) }
func (s *session) upstreamWriter() { defer s.exit(); s.write(&s.upstream, &s.client) }

// idleGrace is how long a reader whose socket has gone quiet keeps
// waiting in its goroutine before it parks. A socket with bytes at least
// this often (a live feed) never pays for parking and waking again — an
// epoll_ctl and a goroutine start per message, which cost sluice a
// quarter more CPU in the broadcast load — while one quiet for longer (an
// idle client between keepalive pings) gives its goroutine up.
const idleGrace = time.Second

// quiet is called between frames by the reader of a leg that may park
// (src.raw is set only with the epoll set). It reports whether
// the reader parked, after its socket stayed empty for idleGrace; when
// it returns false, bytes are buffered or the caller waits in ReadHeader.
func (s *session) quiet(src *leg) (parked bool, err error) {
	idle, err := src.rd.Idle()
	if err != nil || !idle {
		return false, err
	}
	src.conn.SetReadDeadline(time.Now().Add(idleGrace))
	err = src.rd.Wait()
	src.conn.SetReadDeadline(time.Time{})
	if err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
		return false, err
	}
	return s.srv.idle.park(src), nil
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
func (s *session) pump(src, dst *leg) int {
	// A peer may encode a control frame's length in 16 or 64 bits: room
	// for the longest header, not the shortest.
	var ctl [frame.MaxHeaderSize + ws.MaxControlFramePayloadSize]byte
	var ctlPayload [ws.MaxControlFramePayloadSize]byte
	dir := toUpstream
	if src.upstream {
		dir = toClient
	}
	msgs, byts := s.srv.metrics.messages[dir], s.srv.metrics.bytes[dir]
	for {
		src.frameEnd() // frame read timeout (admission.go): idle between frames is fine
		if src.raw != nil {
			parked, err := s.quiet(src)
			if err != nil {
				s.lost(src, err)
				return readerLost
			}
			if parked {
				return readerParked
			}
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
		if err := src.check.Check(h); err != nil {
			s.violation(src, err.(*frame.Error))
			return readerDraining
		}
		src.frameStart(h) // the frame must now arrive whole within FrameReadTimeout
		if src.ka != nil {
			src.ka.Heard()
		}
		size := int64(len(raw)) + h.Length
		if h.OpCode.IsControl() {
			n := copy(ctl[:], raw)
			wire := ctl[:n+int(h.Length)]
			if err := src.rd.ReadSmall(wire[n:]); err != nil {
				s.lost(src, err)
				return readerLost
			}
			payload := ctlPayload[:h.Length]
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
					continue
				}
			}
			// A full priority lane makes this reader wait: a peer's ping
			// or pong is never dropped. It fails only once dst is closing.
			seg := limiter.NewSegment(len(wire))
			*seg.Buf = append(*seg.Buf, wire...)
			if dst.out.PushControl(seg) != nil {
				seg.Free()
			}
			continue
		}

		if src.skipRest {
			// The rest of a message whose start was refused: a
			// continuation alone would be a protocol error at dst.
			src.skipRest = !h.Fin
			if err := src.rd.Discard(h.Length); err != nil {
				s.lost(src, err)
				return readerLost
			}
			continue
		}
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
			if dst.streamDone == nil {
				// Before the push: the writer and the queue's discard
				// reach it only through a streamed segment.
				dst.streamDone = make(chan error, 1)
				dst.out.OnStreamDiscard(dst.streamDone)
			}
		}
		seg.Start = h.OpCode != ws.OpContinuation
		seg.End = h.Fin
		follow := seg.Follow
		byts.Add(float64(size))
		src.bytesIn += uint64(size)
		if h.Fin {
			msgs.Inc()
			src.msgsIn++
		}
		err = dst.out.Push(seg)
		switch err {
		case nil:
			if follow > 0 {
				// dst's writer copies the payload straight from src's
				// socket; src is not read until it is done.
				switch err := <-dst.streamDone; err {
				case nil:
					continue
				case limiter.ErrClosed:
					// Discarded unwritten: skip the payload below.
				default:
					// The copy broke mid-frame: src's stream has no
					// frame boundary left to read at, so its close reply
					// cannot be awaited either.
					s.mu.Lock()
					src.noReply = true
					s.checkDoneLocked()
					s.unlock()
					return readerDraining
				}
			} else {
				continue
			}
		case limiter.ErrOverflow:
			s.end(causeSlow, nil)
		case limiter.ErrPauseTimeout:
			s.end(causePauseTimeout, nil)
		}
		// The frame has nowhere to go: dst is closing. Keep reading src
		// until its close frame answers ours.
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
	}
}

// write is the only goroutine that writes to dst's socket while it runs.
// It takes batches from dst's queue, control frames first, and writes each
// batch with one writev under a deadline; it ends when the queue is empty
// (the queue starts the next writer) and after a close frame.
func (s *session) write(dst, src *leg) {
	var batch [maxBatch]*limiter.Segment
	timeout := s.srv.opts.WriteTimeout
	for {
		segs, err := dst.out.Take(batch[:0], batchBytes)
		if err != nil {
			return
		}
		iov := iovecPool.Get().(*iovecs)
		for i, seg := range segs {
			iov.bufs[i] = seg.Bytes()
		}
		iov.nb = iov.bufs[:len(segs)]
		last := segs[len(segs)-1]
		deadline := timeout
		if last.Close && onlyControl(segs) {
			// A close with no data before it is best effort: a slow
			// client's window may be shut for good.
			deadline = min(timeout, closeWriteTimeout)
		}
		dst.conn.SetWriteDeadline(time.Now().Add(deadline))
		_, err = iov.nb.WriteTo(dst.conn)
		iov.bufs = [maxBatch][]byte{}
		iovecPool.Put(iov)
		if err == nil && last.Follow > 0 {
			err = s.stream(dst, src, last.Follow)
			dst.streamDone <- err
		} else if last.Follow > 0 {
			dst.streamDone <- err
		}
		closed := last.Close
		for i, seg := range segs {
			seg.Free()
			batch[i] = nil
		}
		if err != nil {
			s.writeFailed(dst, err)
			return
		}
		if closed {
			if !dst.upstream {
				// Nothing follows a close frame: FIN tells the client
				// so, and it closes its side (close.go).
				halfClose(dst.conn)
			}
			s.closeWritten(dst)
			return
		}
	}
}

// streamChunk is how much of a streamed payload one write deadline
// covers: the deadline bounds a stall, not the time a large frame takes.
const streamChunk = 1 << 20

// stream copies n payload bytes from src's socket to dst's (splice), with
// a fresh write deadline per chunk.
func (s *session) stream(dst, src *leg, n int64) error {
	for n > 0 {
		chunk := min(n, streamChunk)
		dst.conn.SetWriteDeadline(time.Now().Add(s.srv.opts.WriteTimeout))
		m, err := src.rd.CopyN(dst.conn, chunk)
		n -= m
		if err != nil {
			return err
		}
	}
	return nil
}

// maxBatch bounds the frames in one writev.
const maxBatch = 64

// iovecs is a writer's scratch for one writev, pooled so that an idle
// writer holds none.
type iovecs struct {
	bufs [maxBatch][]byte
	nb   net.Buffers
}

var iovecPool = sync.Pool{New: func() any { return new(iovecs) }}

// closeWriteTimeout bounds the write of a close frame that no data
// precedes (evictions, protocol errors).
const closeWriteTimeout = time.Second

func onlyControl(segs []*limiter.Segment) bool {
	for _, s := range segs {
		if !s.Control {
			return false
		}
	}
	return true
}

// enter counts a new writer goroutine in, unless the session has already
// finished.
func (s *session) enter() bool {
	for {
		n := s.running.Load()
		if n == 0 {
			return false
		}
		if s.running.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// exit is deferred by each goroutine; the last one finishes the session.
func (s *session) exit() {
	if s.running.Add(-1) != 0 {
		return
	}
	s.abort("")
	s.srv.idle.forget(&s.client)
	s.srv.idle.forget(&s.upstream)
	s.client.rd.Release()
	s.upstream.rd.Release()
	m := s.srv.metrics
	m.connectionsActive.Dec()
	d := time.Since(s.began)
	m.sessionSeconds.Observe(d.Seconds())
	s.mu.Lock()
	reason, c := s.endReason, s.cause
	s.mu.Unlock()
	ev := s.event(s.srv.log.Info())
	if endings[c].eviction {
		ev = ev.Str("evicted", endings[c].label)
	}
	ev.Str("reason", reason).
		Dur("duration", d).
		Int("client_close_sent", int(s.client.sentCode)).
		Int("client_close_received", int(s.client.rcvdCode)).
		Int("upstream_close_sent", int(s.upstream.sentCode)).
		Int("upstream_close_received", int(s.upstream.rcvdCode)).
		Uint64("msgs_to_upstream", s.client.msgsIn).
		Uint64("bytes_to_upstream", s.client.bytesIn).
		Uint64("msgs_to_client", s.upstream.msgsIn).
		Uint64("bytes_to_client", s.upstream.bytesIn).
		Msg("session closed")
	s.srv.forget(s)
}

func errString(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "EOF"
	case errors.Is(err, net.ErrClosed):
		return "closed"
	}
	return err.Error()
}
