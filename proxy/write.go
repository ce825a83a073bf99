package proxy

import (
	"errors"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/sluice-proxy/sluice/limiter"
)

// batchBytes bounds one writev.
const batchBytes = 256 << 10

func (s *session) clientWriter() {
	defer s.exit()
	defer s.recoverWriter()
	s.write(&s.client, &s.upstream, nil)
}

func (s *session) upstreamWriter() {
	defer s.exit()
	defer s.recoverWriter()
	s.write(&s.upstream, &s.client, nil)
}

// flush is how a reader that has just queued a frame for dst gets it
// written. When no writer runs it writes dst's queue itself, without
// waiting: one non-blocking writev from the goroutine that is already
// awake, which is how a socket with room (nearly always) gets its frame.
// Only what the socket does not take at once and a spliced payload go to a
// writer goroutine (write), and a writer that runs already will take the
// frame anyway. Close frames queued under s.mu are flushed by unlock.
// Starting a goroutine per frame had cost sluice a fifth of its CPU in the
// broadcast load, in goroutine starts, stack growth and scheduler
// hand-offs.
func (s *session) flush(dst, src *leg) {
	raw := dst.rd.RawConn()
	if raw == nil {
		dst.kick() // TLS: the record layer needs its own writes
		return
	}
	if !dst.writing.CompareAndSwap(false, true) {
		return
	}
	b := getBatch()
	for b.take(dst) {
		last := b.segs[b.n-1]
		if last.Follow == 0 {
			b.off = b.writeNow(raw, dst.conn)
			if b.off == b.size() {
				closed := last.Close
				b.free()
				if !closed {
					continue
				}
				putBatch(b)
				s.closeSent(dst) // writing stays set: nothing follows a close
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
		b.s, b.dst, b.src = s, dst, src
		go b.carry()
		return
	}
	putBatch(b)
}

// write is the only goroutine that writes to dst's socket while it runs.
// It finishes b, a batch flush could not, if any, then takes batches from
// dst's queue, control frames first, and writes each with one writev
// under a deadline; it ends when the queue is empty (the next push starts
// another writer: leg.kick, flush) and after a close frame.
func (s *session) write(dst, src *leg, b *outBatch) {
	if b == nil {
		b = getBatch()
	}
	defer putBatch(b)
	for {
		if b.n == 0 && !b.take(dst) {
			return
		}
		if !s.writeBatch(dst, src, b) {
			return
		}
	}
}

// take fills b with a batch from dst's queue, control frames first, and
// reports whether there is one to write. When the queue is empty the
// writer stops (writing is let go), unless something came after Take
// looked and its pusher saw this writer still running (its kick or flush
// found writing set): then the writer goes on. A closed queue stops the
// writer for good, writing still set.
func (b *outBatch) take(dst *leg) bool {
	for {
		segs, err := dst.queue().Take(b.segs[:0], batchBytes)
		switch err {
		case nil:
			b.n, b.off = len(segs), 0
			return true
		case limiter.ErrIdle:
			dst.writing.Store(false)
			if dst.queue().Pending() && dst.writing.CompareAndSwap(false, true) {
				continue
			}
		}
		return false
	}
}

// writeBatch writes what is left of b to dst under a deadline, then splices
// a following payload, and reports whether the writer goes on.
func (s *session) writeBatch(dst, src *leg, b *outBatch) bool {
	segs := b.segs[:b.n]
	last := segs[len(segs)-1]
	deadline := s.writeTimeout(dst)
	if last.Close && onlyControl(segs) {
		// A close with no data before it is best effort: a slow client's
		// window may be shut for good.
		deadline = min(deadline, closeWriteTimeout)
	}
	dst.conn.SetWriteDeadline(time.Now().Add(deadline))
	_, err := b.buffers().WriteTo(dst.conn)
	if err == nil && last.Follow > 0 {
		err = s.stream(dst, src, last.Follow)
		dst.streamDone <- err
	} else if last.Follow > 0 {
		dst.streamDone <- err
	}
	closed := last.Close
	b.free()
	if err != nil {
		s.writeFailed(dst, err)
		return false
	}
	if closed {
		s.closeSent(dst)
		return false
	}
	return true
}

// closeSent: dst's close frame is on the wire.
func (s *session) closeSent(dst *leg) {
	if !dst.upstream {
		// Nothing follows a close frame: FIN tells the client so, and it
		// closes its side (close.go).
		halfClose(dst.conn)
	}
	s.closeWritten(dst)
}

// writeTimeout bounds one write to dst: a client that takes nothing for
// WriteTimeout is evicted, a backend for UpstreamWriteTimeout has stopped
// reading.
func (s *session) writeTimeout(dst *leg) time.Duration {
	if dst.upstream {
		return s.srv.opts.UpstreamWriteTimeout
	}
	return s.srv.opts.WriteTimeout
}

// streamChunk is how much of a streamed payload one write deadline
// covers: the deadline bounds a stall, not the time a large frame takes.
const streamChunk = 1 << 20

// errUpstreamStalled: a payload spliced from the upstream stopped
// arriving for UpstreamFrameReadTimeout.
var errUpstreamStalled = errors.New("proxy: upstream stalled in the middle of a frame")

// stream copies n payload bytes from src's socket to dst's (splice), with
// a fresh write deadline per chunk, and from an upstream a fresh read
// deadline (UpstreamFrameReadTimeout; not over TLS, whose failures cannot
// tell one side from the other).
func (s *session) stream(dst, src *leg, n int64) error {
	var readTimeout time.Duration
	if src.upstream && src.rd.RawConn() != nil {
		readTimeout = s.srv.opts.UpstreamFrameReadTimeout
	}
	for n > 0 {
		chunk := min(n, streamChunk)
		now := time.Now()
		dst.conn.SetWriteDeadline(now.Add(s.writeTimeout(dst)))
		if readTimeout > 0 {
			src.conn.SetReadDeadline(now.Add(readTimeout))
		}
		m, err := src.rd.CopyN(dst.conn, chunk)
		n -= m
		dst.queue().Streamed(m) // what the client acknowledges of it is progress
		if err != nil {
			if readTimeout > 0 && errors.Is(err, os.ErrDeadlineExceeded) && src.readDeadlinePassed() {
				return errUpstreamStalled
			}
			return err
		}
	}
	if readTimeout > 0 {
		// src's reader, waiting on streamDone, owns the socket again.
		src.conn.SetReadDeadline(time.Time{})
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

	// A batch flush hands to a writer goroutine (carry).
	s        *session
	dst, src *leg
	carry    func()
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
	b.s, b.dst, b.src = nil, nil, nil
	batchPool.Put(b)
}

// carryOn is the writer goroutine flush starts for a batch it could not
// finish.
func (b *outBatch) carryOn() {
	s, dst, src := b.s, b.dst, b.src
	defer s.exit()
	defer s.recoverWriter()
	s.write(dst, src, b)
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
