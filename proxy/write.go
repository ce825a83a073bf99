package proxy

import (
	"net"
	"sync"
	"time"

	"sluice/limiter"
)

// batchBytes bounds one writev.
const batchBytes = 256 << 10

func (s *session) clientWriter()   { defer s.exit(); s.write(&s.client, &s.upstream) }
func (s *session) upstreamWriter() { defer s.exit(); s.write(&s.upstream, &s.client) }

// write is the only goroutine that writes to dst's socket while it runs.
// It takes batches from dst's queue, control frames first, and writes each
// batch with one writev under a deadline; it ends when the queue is empty
// (the next push starts another: leg.kick) and after a close frame.
func (s *session) write(dst, src *leg) {
	var batch [maxBatch]*limiter.Segment
	timeout := s.srv.opts.WriteTimeout
	for {
		segs, err := dst.queue().Take(batch[:0], batchBytes)
		if err == limiter.ErrIdle {
			// Stopped: unless something came after Take looked and its
			// pusher saw this writer still running, in which case this
			// writer goes on (the pusher's kick found writing set).
			dst.writing.Store(false)
			if dst.queue().Pending() && dst.writing.CompareAndSwap(false, true) {
				continue
			}
			return
		}
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
