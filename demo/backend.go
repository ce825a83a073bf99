package demo

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"maps"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gobwas/ws"
)

// --- the naive backend ---

// demoBackend is a broadcast server written the way many are: every
// message is appended to every connection's queue, and a writer per
// connection drains it as fast as the socket allows. Nothing bounds a
// queue, so one client that stops reading makes the backend's memory grow
// for as long as the run lasts. It speaks gobwas/ws at the frame level,
// as sluice does, so the demo adds no WebSocket library to the binary.
type demoBackend struct {
	ln   net.Listener
	rate int
	size int

	queued      atomic.Int64 // bytes waiting in all connections' queues
	peak        atomic.Int64 // highest queued seen
	peakBacklog atomic.Int64 // highest single connection's backlog seen

	stop          chan struct{} // closed to stop the broadcaster
	stopOnce      sync.Once
	broadcastDone chan struct{}
	started       atomic.Bool

	mu     sync.Mutex
	conns  map[*backendConn]struct{} // guarded by mu
	closed bool                      // guarded by mu

	wg sync.WaitGroup // the acceptor and every connection goroutine
}

// backendConn is one connection of the demo backend.
type backendConn struct {
	b       *demoBackend
	conn    net.Conn
	backlog atomic.Int64 // bytes queued or being written
	wake    chan struct{}

	mu         sync.Mutex
	queue      [][]byte // guarded by mu; frames not yet written, unbounded on purpose
	closing    bool     // guarded by mu: the writer stops
	closeFrame []byte   // guarded by mu: written by the writer before it stops
}

func startDemoBackend(rate, size int) (*demoBackend, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		// Accepted sockets inherit both options.
		return setSockopts(c, sockopt{syscall.SOL_SOCKET, syscall.SO_SNDBUF, backendSendBuf},
			sockopt{syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, ethernetMSS})
	}}
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("demo: backend: %w", err)
	}
	b := &demoBackend{
		ln: ln, rate: rate, size: size,
		stop: make(chan struct{}), broadcastDone: make(chan struct{}),
		conns: make(map[*backendConn]struct{}),
	}
	b.wg.Add(1)
	go b.backendAcceptor()
	return b, nil
}

func (b *demoBackend) addr() string { return b.ln.Addr().String() }

func (b *demoBackend) backendAcceptor() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.wg.Add(1)
		go b.backendReader(c)
	}
}

// backendReader upgrades c, starts its writer and reads until the peer
// closes: frames from sluice are discarded, pings answered, a close echoed.
func (b *demoBackend) backendReader(c net.Conn) {
	defer b.wg.Done()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := ws.Upgrade(c); err != nil {
		c.Close()
		return
	}
	c.SetDeadline(time.Time{})
	bc := &backendConn{b: b, conn: c, wake: make(chan struct{}, 1)}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		c.Close()
		return
	}
	b.conns[bc] = struct{}{}
	b.wg.Add(1)
	b.mu.Unlock()
	go bc.backendWriter()

	br := bufio.NewReaderSize(c, 1024)
	var ctl [ws.MaxControlFramePayloadSize]byte
	for {
		h, err := ws.ReadHeader(br)
		if err != nil {
			bc.end(nil)
			return
		}
		if !h.OpCode.IsControl() {
			if _, err := io.CopyN(io.Discard, br, h.Length); err != nil {
				bc.end(nil)
				return
			}
			continue
		}
		if h.Length > int64(len(ctl)) {
			bc.end(ws.MustCompileFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(ws.StatusProtocolError, ""))))
			return
		}
		p := ctl[:h.Length]
		if _, err := io.ReadFull(br, p); err != nil {
			bc.end(nil)
			return
		}
		if h.Masked {
			ws.Cipher(p, h.Mask, 0)
		}
		switch h.OpCode {
		case ws.OpClose:
			code := ws.StatusNormalClosure
			if len(p) >= 2 {
				code = ws.StatusCode(binary.BigEndian.Uint16(p))
			}
			bc.end(ws.MustCompileFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(code, ""))))
			return
		case ws.OpPing:
			bc.enqueue(ws.MustCompileFrame(ws.NewPongFrame(p)))
		}
	}
}

// end asks the writer to write closeFrame (if any) and stop.
func (bc *backendConn) end(closeFrame []byte) {
	bc.mu.Lock()
	bc.closing = true
	bc.closeFrame = closeFrame
	bc.mu.Unlock()
	if closeFrame == nil {
		bc.conn.Close() // unblocks a writer stuck on a dead peer
	}
	bc.signal()
}

func (bc *backendConn) signal() {
	select {
	case bc.wake <- struct{}{}:
	default:
	}
}

// enqueue appends frame to the connection's queue, without any bound.
func (bc *backendConn) enqueue(frame []byte) {
	n := int64(len(frame))
	bc.mu.Lock()
	if bc.closing {
		bc.mu.Unlock()
		return
	}
	bc.queue = append(bc.queue, frame)
	bc.mu.Unlock()
	backlog := bc.backlog.Add(n)
	bc.b.queued.Add(n)
	atomicMax(&bc.b.peakBacklog, backlog)
	bc.signal()
}

// backendWriter is the only goroutine writing to the connection. Like the
// naive servers it imitates, it sets no write deadline: a client that stops
// reading blocks it, and the queue grows behind it.
func (bc *backendConn) backendWriter() {
	defer bc.b.wg.Done()
	defer bc.finish()
	for {
		bc.mu.Lock()
		for len(bc.queue) == 0 && !bc.closing {
			bc.mu.Unlock()
			<-bc.wake
			bc.mu.Lock()
		}
		if bc.closing {
			frame := bc.closeFrame
			bc.mu.Unlock()
			if frame != nil {
				bc.conn.SetWriteDeadline(time.Now().Add(time.Second))
				bc.conn.Write(frame)
			}
			return
		}
		batch := bc.queue
		bc.queue = nil
		bc.mu.Unlock()
		var n int64
		for _, f := range batch {
			n += int64(len(f))
		}
		bufs := net.Buffers(batch)
		_, err := bufs.WriteTo(bc.conn)
		bc.backlog.Add(-n)
		bc.b.queued.Add(-n)
		if err != nil {
			return
		}
	}
}

// finish closes the connection and forgets its queue.
func (bc *backendConn) finish() {
	bc.conn.Close()
	b := bc.b
	b.mu.Lock()
	delete(b.conns, bc)
	b.mu.Unlock()
	bc.mu.Lock()
	bc.closing = true
	bc.queue = nil
	bc.mu.Unlock()
	left := bc.backlog.Swap(0)
	b.queued.Add(-left)
}

func (b *demoBackend) startBroadcast() {
	b.started.Store(true)
	go b.backendBroadcaster()
}

// backendBroadcaster sends -rate messages a second to every connection. A
// message is the send time (unix nanoseconds) and a sequence number, both
// big-endian uint64, padded to -size bytes; the frame is encoded once and
// shared by every queue.
func (b *demoBackend) backendBroadcaster() {
	defer close(b.broadcastDone)
	interval := max(time.Second/time.Duration(b.rate), time.Millisecond)
	t := time.NewTicker(interval)
	defer t.Stop()
	start := time.Now()
	var sent int64
	var conns []*backendConn
	var hdr bytes.Buffer // the same for every message
	ws.WriteHeader(&hdr, ws.Header{Fin: true, OpCode: ws.OpBinary, Length: int64(b.size)})
	for {
		select {
		case <-b.stop:
			return
		case now := <-t.C:
			due := int64(now.Sub(start)) * int64(b.rate) / int64(time.Second)
			if sent >= due {
				continue
			}
			b.mu.Lock()
			conns = conns[:0]
			for bc := range b.conns {
				conns = append(conns, bc)
			}
			b.mu.Unlock()
			for ; sent < due; sent++ {
				frame := make([]byte, hdr.Len()+b.size) // zeroed: the padding
				stamp := frame[copy(frame, hdr.Bytes()):]
				binary.BigEndian.PutUint64(stamp[:8], uint64(time.Now().UnixNano()))
				binary.BigEndian.PutUint64(stamp[8:16], uint64(sent+1))
				for _, bc := range conns {
					bc.enqueue(frame)
				}
			}
			atomicMax(&b.peak, b.queued.Load())
		}
	}
}

func (b *demoBackend) stopBroadcast() {
	b.stopOnce.Do(func() { close(b.stop) })
	if b.started.Load() {
		<-b.broadcastDone
	}
}

// stats returns the bytes queued in all connections and the largest
// single backlog.
func (b *demoBackend) stats() (queued, largest int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for bc := range b.conns {
		largest = max(largest, bc.backlog.Load())
	}
	return b.queued.Load(), largest
}

// close stops the backend and waits for all its goroutines. Idempotent.
func (b *demoBackend) close() {
	b.stopBroadcast()
	b.ln.Close()
	b.mu.Lock()
	b.closed = true
	conns := slices.Collect(maps.Keys(b.conns))
	b.mu.Unlock()
	for _, bc := range conns {
		bc.end(nil)
	}
	b.wg.Wait()
}
