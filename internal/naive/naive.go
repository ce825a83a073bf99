// Package naive is the broadcast backend sluice exists to protect: it
// queues every message for every connection without bound, and its writers
// set no deadline, so one client that stops reading makes its memory grow
// for as long as the run lasts. The demo runs it in process; the load
// harness runs it as a process of its own (`loadtest backend`). It speaks
// gobwas/ws at the frame level, as sluice does, so the demo adds no
// WebSocket library to the sluice binary. In echo mode it is instead the
// backend that clients flood: it sends every message back after a fixed
// amount of busy CPU work, and counts messages by client.
package naive

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// HeaderLen is the part of every message that carries its sequence number
// (bytes 0-7) and the time the backend built it (bytes 8-15, Unix
// nanoseconds), both big-endian; the rest is zero padding.
const HeaderLen = 16

// Config shapes what a Backend broadcasts.
type Config struct {
	Size int     // bytes per message, at least HeaderLen
	Rate float64 // messages per second to every connection; 0: idle, it only reads
	// Serialise writes every message to every connection in turn from the
	// broadcasting goroutine, with no queue and no deadline: a client that
	// does not read blocks everyone behind it.
	Serialise bool
	// Shared queues one buffer per message for every connection instead of
	// a copy per connection.
	Shared bool
	// Echo sends every data frame back to its sender, after Work of busy
	// CPU time per message, from the connection's reader: a backend whose
	// capacity a flooding client can take. Rate must be 0.
	Echo bool
	Work time.Duration
}

// EchoHeaderLen is the part of every echoed message its sender fills:
// sequence number (bytes 0-7) and send time (8-15) as in broadcasts, then
// the sender's client id (16-23), by which the backend counts messages,
// whatever connection (direct or through a proxy) brings them.
const EchoHeaderLen = 24

// maxEchoFrame bounds the payload the echo backend reads into memory.
const maxEchoFrame = 1 << 20

// Stats is what a Backend has done; the load harness reads it as JSON.
type Stats struct {
	Connected  int64 `json:"connected"`  // connections open now
	Accepted   int64 `json:"accepted"`   // upgrades so far
	Broadcasts int64 `json:"broadcasts"` // messages sent to all
	// SkippedTicks are messages never sent because the backend fell more
	// than a second behind its schedule.
	SkippedTicks int64 `json:"skipped_ticks"`
	QueuedBytes  int64 `json:"queued_bytes"` // bytes queued or being written now, all connections
	// PeakQueuedBytes is the highest QueuedBytes seen.
	PeakQueuedBytes int64 `json:"peak_queued_bytes"`
	// PeakBacklogBytes and PeakBacklogMessages are the highest backlog of
	// any one connection.
	PeakBacklogBytes    int64 `json:"peak_backlog_bytes"`
	PeakBacklogMessages int64 `json:"peak_backlog_messages"`
	WriteErrors         int64 `json:"write_errors"`
	// Received counts the data messages clients sent, all connections
	// together; PeakConnReceived is the most any one connection sent. A
	// fragmented message counts once, when it starts.
	Received         int64 `json:"received"`
	PeakConnReceived int64 `json:"peak_conn_received"`
	// Echo mode: messages echoed, the busy-work loop's iterations per
	// message, and messages by client id (from bytes 16-23 of a message's
	// first frame), kept after the connection ends.
	Echoed         int64            `json:"echoed,omitempty"`
	WorkIterations int64            `json:"work_iterations,omitempty"`
	PerClient      map[uint64]int64 `json:"per_client,omitempty"`
}

// Backend is a naive broadcast server. Connections come in through Serve
// (a raw listener) or ServeHTTP (behind an http.Server); nothing is sent
// until Start.
type Backend struct {
	cfg    Config
	queues bool // connections have a queue and a writer goroutine

	stop     chan struct{} // closed by Stop
	stopOnce sync.Once
	ticks    sync.WaitGroup // the broadcaster

	mu      sync.Mutex
	conns   map[*conn]struct{} // open connections; guarded by mu
	closing bool               // no more connections; guarded by mu

	wg sync.WaitGroup // acceptors, readers and writers

	accepted, connected, broadcasts, writeErrors atomic.Int64
	skipped                                      atomic.Int64 // ticks not sent
	queued, peakQueued                           atomic.Int64
	peakBacklogBytes, peakBacklogMessages        atomic.Int64
	received, peakConnReceived                   atomic.Int64 // inbound data messages

	echoed    atomic.Int64
	workIters int64                    // busy-loop iterations per message; set by New
	perClient map[uint64]*atomic.Int64 // echo mode: messages by client id; guarded by mu
}

// conn is one client connection of the backend.
type conn struct {
	b    *Backend
	c    net.Conn
	wake chan struct{} // buffered 1: the queue has work, or the conn closes

	wmu sync.Mutex // serialises writes without a queue (naively, across the write)

	received int64 // data messages the client sent; owned by the reader

	mu       sync.Mutex
	queue    [][]byte // frames waiting to be written, unbounded on purpose; guarded by mu
	backlog  int64    // bytes queued or being written; guarded by mu
	inFlight int64    // messages queued or being written; guarded by mu
	closed   bool     // the writer stops; guarded by mu
	bye      []byte   // close frame the writer writes before it stops; guarded by mu
	ended    bool     // the writer has stopped; guarded by mu
}

// New returns a backend that broadcasts as cfg says once started.
func New(cfg Config) (*Backend, error) {
	if cfg.Size < HeaderLen || cfg.Rate < 0 {
		return nil, fmt.Errorf("naive: want a size of at least %d and a rate of at least 0, got %d and %v", HeaderLen, cfg.Size, cfg.Rate)
	}
	if cfg.Echo && cfg.Rate != 0 || cfg.Work < 0 {
		return nil, fmt.Errorf("naive: echo wants rate 0 and work of at least 0, got %v and %v", cfg.Rate, cfg.Work)
	}
	b := &Backend{
		cfg:       cfg,
		queues:    cfg.Rate > 0 && !cfg.Serialise,
		stop:      make(chan struct{}),
		conns:     make(map[*conn]struct{}),
		perClient: make(map[uint64]*atomic.Int64),
	}
	if cfg.Echo && cfg.Work > 0 {
		b.workIters = Calibrate(cfg.Work)
	}
	return b, nil
}

// Serve accepts connections on ln, upgrades them and serves them, until ln
// is closed; the caller closes ln before Close, which waits for every
// connection Serve took.
func (b *Backend) Serve(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		b.mu.Lock()
		if b.closing {
			b.mu.Unlock()
			c.Close()
			continue
		}
		b.wg.Add(1) // under mu, before Close can set closing and wait
		b.mu.Unlock()
		go func() {
			defer b.wg.Done()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := ws.Upgrade(c); err != nil {
				c.Close()
				return
			}
			c.SetDeadline(time.Time{})
			b.backendReader(c, bufio.NewReaderSize(c, 1024))
		}()
	}
}

// ServeHTTP upgrades one request and serves the connection until it ends.
func (b *Backend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c, rw, _, err := ws.UpgradeHTTP(r, w)
	if err != nil {
		return
	}
	b.backendReader(c, rw.Reader)
}

// backendReader registers c, starts its writer and reads until the peer
// closes: data frames are counted and discarded, as fast as they come
// (the naive server has no inbound limit either), pings answered, a close
// echoed.
func (b *Backend) backendReader(c net.Conn, br *bufio.Reader) {
	bc := &conn{b: b, c: c, wake: make(chan struct{}, 1)}
	b.mu.Lock()
	if b.closing {
		b.mu.Unlock()
		c.Close()
		return
	}
	b.conns[bc] = struct{}{}
	b.wg.Add(1) // under mu, before Close can set closing and wait
	defer b.wg.Done()
	if b.queues {
		b.wg.Add(1)
		go bc.backendWriter()
	}
	b.mu.Unlock()
	b.accepted.Add(1)
	b.connected.Add(1)
	defer b.drop(bc)

	var ctl [ws.MaxControlFramePayloadSize]byte
	var echo echoState
	for {
		h, err := ws.ReadHeader(br)
		if err != nil {
			return
		}
		if !h.OpCode.IsControl() && b.cfg.Echo {
			if h.Length > maxEchoFrame {
				bc.control(ws.MustCompileFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(ws.StatusMessageTooBig, ""))), true)
				return
			}
			if err := bc.echo(br, h, &echo); err != nil {
				return
			}
			continue
		}
		if !h.OpCode.IsControl() {
			if h.OpCode != ws.OpContinuation {
				bc.received++
				b.received.Add(1)
				raise(&b.peakConnReceived, bc.received)
			}
			if _, err := io.CopyN(io.Discard, br, h.Length); err != nil {
				return
			}
			continue
		}
		if h.Length > int64(len(ctl)) {
			bc.control(ws.MustCompileFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(ws.StatusProtocolError, ""))), true)
			return
		}
		p := ctl[:h.Length]
		if _, err := io.ReadFull(br, p); err != nil {
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
			bc.control(ws.MustCompileFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(code, ""))), true)
			return
		case ws.OpPing:
			bc.control(ws.MustCompileFrame(ws.NewPongFrame(p)), false)
		}
	}
}

// echoState is an echoing reader's: its payload buffer, and the counter
// of the client sending on the connection, found from its first message.
type echoState struct {
	buf     []byte
	counter *atomic.Int64
}

// echo reads the data frame with header h and writes it back unmasked,
// after the busy work when it ends a message; it counts a message when
// its first frame starts. Echo mode has no queues: the write is direct.
func (bc *conn) echo(br *bufio.Reader, h ws.Header, st *echoState) error {
	b := bc.b
	if int64(cap(st.buf)) < h.Length {
		st.buf = make([]byte, h.Length)
	}
	p := st.buf[:h.Length]
	if _, err := io.ReadFull(br, p); err != nil {
		return err
	}
	if h.Masked {
		ws.Cipher(p, h.Mask, 0)
		h.Masked = false
	}
	if h.OpCode != ws.OpContinuation {
		if st.counter == nil && len(p) >= EchoHeaderLen {
			st.counter = b.clientCounter(binary.BigEndian.Uint64(p[16:]))
		}
		if st.counter != nil {
			st.counter.Add(1)
		}
	}
	if h.Fin {
		Spin(b.workIters)
		b.echoed.Add(1)
	}
	var hdr [ws.MaxHeaderSize]byte
	w := fixedWriter{p: hdr[:]}
	ws.WriteHeader(&w, h)
	bufs := net.Buffers{hdr[:w.n], p}
	bc.wmu.Lock()
	_, err := bufs.WriteTo(bc.c)
	bc.wmu.Unlock()
	if err != nil {
		b.writeErrors.Add(1)
	}
	return err
}

// clientCounter is the message counter of client id, made on first use.
func (b *Backend) clientCounter(id uint64) *atomic.Int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	c := b.perClient[id]
	if c == nil {
		c = new(atomic.Int64)
		b.perClient[id] = c
	}
	return c
}

// spinSink keeps the busy loop's result alive, so the compiler cannot
// drop the loop.
var spinSink atomic.Uint64

// Spin burns CPU for n iterations of a xorshift step.
func Spin(n int64) {
	x := uint64(n) | 1
	for range n {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
	}
	spinSink.Add(x)
}

// Calibrate is how many Spin iterations take d of CPU on this machine: the
// fastest of several timed runs, so a run the scheduler interrupted does
// not inflate the work.
func Calibrate(d time.Duration) int64 {
	const probe = 1 << 20
	best := time.Duration(1<<63 - 1)
	for range 7 {
		t0 := time.Now()
		Spin(probe)
		best = min(best, time.Since(t0))
	}
	return max(1, int64(float64(probe)*float64(d)/float64(max(best, 1))))
}

// control sends a pong or, with last, a close frame: behind the queued
// messages where there is a queue, at once otherwise.
func (bc *conn) control(frame []byte, last bool) {
	if !bc.b.queues {
		bc.wmu.Lock()
		if last {
			bc.c.SetWriteDeadline(time.Now().Add(time.Second))
		}
		bc.c.Write(frame)
		bc.wmu.Unlock()
		return
	}
	if !last {
		bc.enqueue(frame)
		return
	}
	bc.mu.Lock()
	bc.closed, bc.bye = true, frame
	bc.mu.Unlock()
	bc.signal()
}

func (bc *conn) signal() {
	select {
	case bc.wake <- struct{}{}:
	default:
	}
}

// drop frees bc's queue and wakes its writer; then, unless the writer
// still has a close frame to write (it calls drop again once it has), it
// forgets bc and closes its socket, which ends a write in progress.
func (b *Backend) drop(bc *conn) {
	bc.mu.Lock()
	bc.closed = true
	var freed int64
	for _, m := range bc.queue {
		freed += int64(len(m))
	}
	bc.backlog -= freed
	bc.inFlight -= int64(len(bc.queue))
	bc.queue = nil
	keep := bc.bye != nil && !bc.ended
	bc.mu.Unlock()
	b.queued.Add(-freed)
	bc.signal()
	if keep {
		return
	}
	b.mu.Lock()
	_, ok := b.conns[bc]
	delete(b.conns, bc)
	b.mu.Unlock()
	if ok {
		b.connected.Add(-1)
	}
	bc.c.Close()
}

// enqueue appends frame to bc's queue, without any bound, and wakes its
// writer.
func (bc *conn) enqueue(frame []byte) {
	b, n := bc.b, int64(len(frame))
	bc.mu.Lock()
	if bc.closed {
		bc.mu.Unlock()
		return
	}
	bc.queue = append(bc.queue, frame)
	bc.backlog += n
	bc.inFlight++
	backlog, msgs := bc.backlog, bc.inFlight
	bc.mu.Unlock()
	raise(&b.peakBacklogBytes, backlog)
	raise(&b.peakBacklogMessages, msgs)
	raise(&b.peakQueued, b.queued.Add(n))
	bc.signal()
}

// backendWriter is the only goroutine writing to a queued connection. Like
// the naive servers it imitates, it sets no write deadline: a client that
// stops reading blocks it, and the queue grows behind it.
func (bc *conn) backendWriter() {
	b := bc.b
	defer b.wg.Done()
	defer func() {
		bc.mu.Lock()
		bc.ended = true
		bc.mu.Unlock()
		b.drop(bc)
	}()
	var batch [][]byte
	for range bc.wake {
		bc.mu.Lock()
		if bc.closed {
			bye := bc.bye
			bc.mu.Unlock()
			if bye != nil {
				bc.c.SetWriteDeadline(time.Now().Add(time.Second))
				bc.c.Write(bye)
			}
			return
		}
		batch, bc.queue = bc.queue, batch[:0]
		bc.mu.Unlock()
		var n int64
		for _, f := range batch {
			n += int64(len(f))
		}
		bufs := net.Buffers(batch)
		_, err := bufs.WriteTo(bc.c)
		bc.mu.Lock()
		bc.backlog -= n
		bc.inFlight -= int64(len(batch))
		bc.mu.Unlock()
		b.queued.Add(-n)
		clear(batch)
		if err != nil {
			b.writeErrors.Add(1)
			return
		}
	}
}

// Start begins broadcasting Rate messages a second to every connection;
// with Rate 0 it does nothing.
func (b *Backend) Start() {
	if b.cfg.Rate <= 0 {
		return
	}
	b.ticks.Add(1)
	go b.backendBroadcaster()
}

// Stop ends the broadcast and waits for the broadcaster; with Serialise,
// a write blocked on a client that does not read holds it up until Close.
// Idempotent.
func (b *Backend) Stop() {
	b.stopOnce.Do(func() { close(b.stop) })
	b.ticks.Wait()
}

// backendBroadcaster sends messages on a fixed schedule, ticking at most
// every millisecond: after a stall (a blocked serialised write, or no CPU)
// it catches up on the messages due, at most one second's worth; older
// ones are skipped (counted, and with no gap in sequence numbers).
func (b *Backend) backendBroadcaster() {
	defer b.ticks.Done()
	rate := b.cfg.Rate
	interval := time.Duration(float64(time.Second) / rate)
	tick := time.NewTicker(max(interval, time.Millisecond))
	defer tick.Stop()
	burst := max(uint64(rate), 1)
	start := time.Now()
	var ticks, seq uint64 // ticks consumed (sent or skipped); messages sent
	var hdr [ws.MaxHeaderSize]byte
	hdrLen := headerInto(hdr[:], b.cfg.Size)
	var targets []*conn
	for {
		select {
		case <-b.stop:
			return
		case <-tick.C:
		}
		due := uint64(time.Since(start).Seconds() * rate)
		if due-ticks > burst {
			b.skipped.Add(int64(due - ticks - burst))
			ticks = due - burst
		}
		for ; ticks < due; ticks++ {
			select {
			case <-b.stop:
				return
			default:
			}
			seq++
			targets = b.broadcast(seq, hdr[:hdrLen], targets[:0])
		}
	}
}

// headerInto writes the header of a message frame to p and returns its
// length.
func headerInto(p []byte, size int) int {
	w := fixedWriter{p: p}
	ws.WriteHeader(&w, ws.Header{Fin: true, OpCode: ws.OpBinary, Length: int64(size)})
	return w.n
}

type fixedWriter struct {
	p []byte
	n int
}

func (w *fixedWriter) Write(b []byte) (int, error) {
	w.n += copy(w.p[w.n:], b)
	return len(b), nil
}

// broadcast sends message seq, framed with hdr, to every connection.
// targets is scratch space, returned for reuse.
func (b *Backend) broadcast(seq uint64, hdr []byte, targets []*conn) []*conn {
	frame := make([]byte, len(hdr)+b.cfg.Size) // zeroed: the padding
	msg := frame[copy(frame, hdr):]
	binary.BigEndian.PutUint64(msg, seq)
	binary.BigEndian.PutUint64(msg[8:], uint64(time.Now().UnixNano()))
	b.broadcasts.Add(1)
	b.mu.Lock()
	for c := range b.conns {
		targets = append(targets, c)
	}
	b.mu.Unlock()
	for i, c := range targets {
		if b.cfg.Serialise {
			// The naive loop: a client that does not read blocks
			// everyone behind it.
			c.wmu.Lock()
			_, err := c.c.Write(frame)
			c.wmu.Unlock()
			if err != nil {
				b.writeErrors.Add(1)
			}
			continue
		}
		f := frame
		if !b.cfg.Shared && i > 0 {
			f = append([]byte(nil), frame...)
		}
		c.enqueue(f)
	}
	return targets
}

// raise sets v to n if n is higher.
func raise(v *atomic.Int64, n int64) {
	for {
		cur := v.Load()
		if n <= cur || v.CompareAndSwap(cur, n) {
			return
		}
	}
}

// Stats returns what the backend has done so far.
func (b *Backend) Stats() Stats {
	return Stats{
		Connected:           b.connected.Load(),
		Accepted:            b.accepted.Load(),
		Broadcasts:          b.broadcasts.Load(),
		SkippedTicks:        b.skipped.Load(),
		QueuedBytes:         b.queued.Load(),
		PeakQueuedBytes:     b.peakQueued.Load(),
		PeakBacklogBytes:    b.peakBacklogBytes.Load(),
		PeakBacklogMessages: b.peakBacklogMessages.Load(),
		WriteErrors:         b.writeErrors.Load(),
		Received:            b.received.Load(),
		PeakConnReceived:    b.peakConnReceived.Load(),
		Echoed:              b.echoed.Load(),
		WorkIterations:      b.workIters,
		PerClient:           b.perClientCounts(),
	}
}

// perClientCounts copies the echo counters; nil when there are none.
func (b *Backend) perClientCounts() map[uint64]int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.perClient) == 0 {
		return nil
	}
	out := make(map[uint64]int64, len(b.perClient))
	for id, c := range b.perClient {
		out[id] = c.Load()
	}
	return out
}

// LargestBacklog is the bytes queued or being written for the connection
// that has the most now.
func (b *Backend) LargestBacklog() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	var largest int64
	for bc := range b.conns {
		bc.mu.Lock()
		largest = max(largest, bc.backlog)
		bc.mu.Unlock()
	}
	return largest
}

// Close stops the broadcast, closes every connection, refuses new ones and
// waits for every goroutine the backend started. The caller closes the
// listener (or the http.Server) first, so that Serve returns.
// Idempotent.
func (b *Backend) Close() {
	b.stopOnce.Do(func() { close(b.stop) })
	b.mu.Lock()
	b.closing = true
	all := make([]*conn, 0, len(b.conns))
	for bc := range b.conns {
		all = append(all, bc)
	}
	b.mu.Unlock()
	for _, bc := range all {
		bc.c.Close() // ends its reader, its writer and a serialised write
	}
	b.ticks.Wait()
	b.wg.Wait()
}
