package proxy

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/sluice-proxy/sluice/internal/sockopt"
	"github.com/sluice-proxy/sluice/limiter"
)

// batchBytes bounds one writev.
const batchBytes = 256 << 10

// legWriter is the one way sluice writes a leg's socket. The right to
// write is a token (writing): whoever takes it (a reader or a timer that
// has just queued a frame, through flush) writes what the socket takes at
// once and hands the rest to a writer goroutine of its own (kick, carry),
// which keeps the token until the queue is empty or the close frame is
// out. The socket is held here and nowhere else: a data frame, a ping, a
// pong, a close frame, a spliced payload, TLS records, the FIN and the
// close itself (TLS sends close_notify) all go through these methods.
type legWriter struct {
	l    *leg
	conn net.Conn // the leg's socket: read through l.rd, written only here
	// streamDone carries the result of a streamed payload from this
	// writer to the other leg's reader, which waits for it. Made by that
	// reader before the first streamed frame (most sessions never stream:
	// 128 B saved per leg), and only then given to the queue.
	streamDone chan error
	writing    atomic.Bool // the token: someone writes, or is about to
}

// queue returns the queue of frames to write to l's socket, making the
// upstream leg's on first use. A queue is made even to be closed (abort),
// so that nothing pushed afterwards is taken.
func (l *leg) queue() *limiter.Queue {
	if q := l.out.Load(); q != nil {
		return q
	}
	// Not counted by the Budget's guard (SlowAge 0): a queue that
	// loses the race below is simply dropped.
	q := limiter.NewQueue(&l.s.srv.upstreamQueue, l.s.srv.budget, nil)
	if f := sockopt.UnsentCounter(l.w.conn); f != nil {
		// What the kernel holds unsent for the backend counts as queued,
		// as for the client (the guard samples it, never per frame), and
		// in the pause mark too: a client waits while its backend does
		// not read.
		q.OnUnsent(f)
	}
	if !l.out.CompareAndSwap(nil, q) {
		return l.out.Load()
	}
	l.peer().queue().Tie(q) // the ceiling weighs the session by both
	return q
}

// queuedBytes is what waits in l's queue, without making one.
func (l *leg) queuedBytes() int64 {
	if q := l.out.Load(); q != nil {
		return q.Bytes()
	}
	return 0
}

// kick starts the writer goroutine unless the token is taken: callers
// have just queued something. A writer that finds the queue empty gives
// the token back, then looks once more (take), so nothing queued
// meanwhile waits.
func (w *legWriter) kick() {
	if w.writing.CompareAndSwap(false, true) && w.l.s.enter() {
		b := getBatch()
		b.w = w
		go b.carry()
	}
}

// flush is how whoever has just queued a frame for the leg (a reader, a
// keepalive timer, unlock for a close frame) gets it written. Unless the
// token is taken, it writes the queue itself, without waiting: one
// non-blocking writev from a goroutine that is awake anyway, which is how
// a socket with room (nearly always) gets its frame. Only what the socket
// does not take at once and a spliced payload go to a writer goroutine
// (carry), as starting one per frame costs a goroutine start, stack growth
// and a scheduler hand-off each.
func (w *legWriter) flush() {
	raw := w.l.rd.RawConn()
	if raw == nil {
		w.kick() // TLS: the record layer needs its own writes
		return
	}
	if !w.writing.CompareAndSwap(false, true) {
		return
	}
	s := w.l.s
	b := getBatch()
	for b.take(w) {
		last := b.segs[b.n-1]
		if last.Follow == 0 {
			b.off = b.writeNow(raw, w.conn)
			if b.off == b.size() {
				closed := last.Close
				b.free()
				if !closed {
					continue
				}
				putBatch(b)
				w.closeSent() // writing stays set: nothing follows a close
				return
			}
		}
		// The rest waits for the socket in a goroutine of its own, which
		// counts as the session's like any writer.
		if !s.enter() {
			// The session has finished: its sockets are closed. A spliced
			// frame's reader is told, as Queue.Close tells it.
			if last.Follow > 0 && last.Discarded != nil {
				select {
				case last.Discarded <- limiter.ErrClosed:
				default:
				}
			}
			b.free()
			putBatch(b)
			return
		}
		b.w = w
		go b.carry()
		return
	}
	putBatch(b)
}

// write runs with the token. It finishes what is left of b (a batch
// flush could not write whole; empty from kick), then takes batches from
// the queue, control frames first, and writes each with one writev under
// a deadline; it ends when the queue is empty (the next push starts
// another writer: kick, flush) and after a close frame.
func (w *legWriter) write(b *outBatch) {
	defer putBatch(b)
	for {
		if b.n == 0 && !b.take(w) {
			return
		}
		if !w.writeBatch(b) {
			return
		}
	}
}

// take fills b with a batch from w's queue, control frames first, and
// reports whether there is one to write. When the queue is empty the
// writer gives the token back, unless something came after Take looked
// and its pusher saw the token still taken (its kick or flush found
// writing set): then the writer goes on. A closed queue stops the writer
// for good, the token kept.
func (b *outBatch) take(w *legWriter) bool {
	for {
		segs, err := w.l.queue().Take(b.segs[:0], batchBytes)
		switch err {
		case nil:
			b.n, b.off = len(segs), 0
			return true
		case limiter.ErrIdle:
			w.writing.Store(false)
			if w.l.queue().Pending() && w.writing.CompareAndSwap(false, true) {
				continue
			}
		}
		return false
	}
}

// writeBatch writes what is left of b under a deadline, then splices a
// following payload, and reports whether the writer goes on.
func (w *legWriter) writeBatch(b *outBatch) bool {
	segs := b.segs[:b.n]
	last := segs[len(segs)-1]
	deadline := w.timeout()
	if last.Close && onlyControl(segs) {
		// A close with no data before it is best effort: a slow client's
		// window may be shut for good.
		deadline = min(deadline, closeWriteTimeout)
	}
	w.conn.SetWriteDeadline(time.Now().Add(deadline))
	_, err := b.buffers().WriteTo(w.conn)
	if err == nil && last.Follow > 0 {
		err = w.stream(last.Follow)
		w.streamDone <- err
	} else if last.Follow > 0 {
		w.streamDone <- err
	}
	closed := last.Close
	b.free()
	if err != nil {
		w.l.s.writeFailed(w.l, err)
		return false
	}
	if closed {
		w.closeSent()
		return false
	}
	return true
}

// closeSent: the leg's close frame is on the wire.
func (w *legWriter) closeSent() {
	if !w.l.upstream {
		// Nothing follows a close frame: FIN tells the client so, and it
		// closes its side (close.go).
		w.halfClose()
	}
	w.l.s.closeWritten(w.l)
}

// halfClose sends FIN after sluice's last bytes (its close frame): the
// peer then sees the end of the stream and closes its side, which sluice
// reads to the end before closing (no reset).
func (w *legWriter) halfClose() {
	if cw, ok := w.conn.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

// closeSocket closes the socket, with a reset (SO_LINGER 0) that frees
// what the kernel holds for it at once if reset is set.
func (w *legWriter) closeSocket(reset bool) {
	if reset {
		sockopt.SetLingerZero(w.conn)
	}
	w.conn.Close()
}

// timeout bounds one write: a client that takes nothing for WriteTimeout
// is evicted, a backend for UpstreamWriteTimeout has stopped reading.
func (w *legWriter) timeout() time.Duration {
	if w.l.upstream {
		return w.l.s.srv.opts.UpstreamWriteTimeout
	}
	return w.l.s.srv.opts.WriteTimeout
}

// streamChunk is how much of a streamed payload one write deadline
// covers: the deadline bounds a stall, not the time a large frame takes.
const streamChunk = 1 << 20

// errUpstreamStalled: a payload spliced from the upstream stopped
// arriving for UpstreamFrameReadTimeout.
var errUpstreamStalled = errors.New("proxy: upstream stalled in the middle of a frame")

// stream copies n payload bytes from the other leg's socket to this
// one's (splice), with a fresh write deadline per chunk, and from an
// upstream a fresh read deadline (UpstreamFrameReadTimeout; not over TLS,
// whose failures cannot tell one side from the other).
func (w *legWriter) stream(n int64) error {
	src := w.l.peer()
	var readTimeout time.Duration
	if src.upstream && src.rd.RawConn() != nil {
		readTimeout = w.l.s.srv.opts.UpstreamFrameReadTimeout
	}
	for n > 0 {
		chunk := min(n, streamChunk)
		now := time.Now()
		w.conn.SetWriteDeadline(now.Add(w.timeout()))
		if readTimeout > 0 {
			src.setReadDeadline(now.Add(readTimeout))
		}
		m, err := src.rd.CopyN(w.conn, chunk)
		n -= m
		w.l.queue().Streamed(m) // what the client acknowledges of it is progress
		if err != nil {
			if readTimeout > 0 && errors.Is(err, os.ErrDeadlineExceeded) && src.readDeadlinePassed() {
				return errUpstreamStalled
			}
			return err
		}
	}
	if readTimeout > 0 {
		// src's reader, waiting on streamDone, owns the socket again.
		src.setReadDeadline(time.Time{})
	}
	return nil
}

// maxBatch bounds the frames in one writev.
const maxBatch = 64

// outBatch is one batch of segments taken from a queue and the scratch to
// write it, pooled, so that a leg that is not writing holds none. Its
// callbacks are made once per pooled batch: a closure per write would
// allocate.
type outBatch struct {
	segs [maxBatch]*limiter.Segment
	n    int // segs in use
	off  int // bytes of them already written
	bufs [maxBatch][]byte
	nb   net.Buffers

	// writeNow's writev, inside RawConn.Write.
	vec    [maxBatch]syscall.Iovec
	nvec   int
	wrote  int
	writev func(fd uintptr) bool

	// A batch flush hands to a writer goroutine (carry) with the token.
	w     *legWriter
	carry func()
}

var batchPool sync.Pool

func getBatch() *outBatch {
	if b, _ := batchPool.Get().(*outBatch); b != nil {
		return b
	}
	b := new(outBatch)
	b.writev = b.writevOnce
	b.carry = b.carryOn
	return b
}

func putBatch(b *outBatch) {
	b.bufs = [maxBatch][]byte{}
	b.nb = nil
	b.w = nil
	batchPool.Put(b)
}

// carryOn is the writer goroutine, started by kick with an empty batch or
// by flush with one it could not finish. The batch carries the writer to
// it: its carry is made once per pooled batch, where `go w.write(b)`
// would allocate a closure per start.
func (b *outBatch) carryOn() {
	w := b.w
	defer w.l.s.exit()
	defer w.l.s.recoverWriter()
	w.write(b)
}

func (b *outBatch) size() int {
	n := 0
	for _, seg := range b.segs[:b.n] {
		n += len(seg.Bytes())
	}
	return n
}

// buffers is what is left to write of the batch, as net.Buffers.
func (b *outBatch) buffers() *net.Buffers {
	skip := b.off
	k := 0
	for _, seg := range b.segs[:b.n] {
		p := seg.Bytes()
		if skip >= len(p) {
			skip -= len(p)
			continue
		}
		b.bufs[k] = p[skip:]
		skip = 0
		k++
	}
	b.nb = b.bufs[:k]
	return &b.nb
}

// free returns the batch's segments to their pool; the batch is empty.
func (b *outBatch) free() {
	for i, seg := range b.segs[:b.n] {
		seg.Free()
		b.segs[i] = nil
	}
	b.n, b.off = 0, 0
}

// writeNow writes as much of the batch as the socket takes without
// waiting and returns how many bytes that was: all of them, fewer when
// the socket's buffer is full, 0 on an error (the writer goroutine meets
// it again and reports it).
func (b *outBatch) writeNow(raw syscall.RawConn, conn net.Conn) int {
	b.nvec = 0
	for _, seg := range b.segs[:b.n] {
		p := seg.Bytes()
		b.vec[b.nvec].Base = &p[0]
		b.vec[b.nvec].SetLen(len(p))
		b.nvec++
	}
	b.wrote = 0
	if err := raw.Write(b.writev); errors.Is(err, os.ErrDeadlineExceeded) {
		// A writer goroutine's deadline, passed since: RawConn.Write
		// refuses before writing, and every flush on this leg would start
		// a goroutine until the next one set a fresh deadline. A write
		// that never waits needs none; the caller holds writing.
		conn.SetWriteDeadline(time.Time{})
		raw.Write(b.writev)
	}
	b.vec = [maxBatch]syscall.Iovec{}
	return b.wrote
}

// writevOnce is RawConn.Write's callback for writeNow: one writev, and
// never a wait for the socket to become writable.
func (b *outBatch) writevOnce(fd uintptr) bool {
	for {
		n, _, errno := syscall.Syscall(syscall.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&b.vec[0])), uintptr(b.nvec))
		if errno == syscall.EINTR {
			continue
		}
		if errno == 0 {
			b.wrote = int(n)
		}
		return true
	}
}

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
