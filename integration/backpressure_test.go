package integration

// End-to-end tests of sluice's backpressure promises: a slow client never
// grows the memory of the backend or of sluice without bound and never
// slows the fast clients down. Each test puts a real sluice Server between
// a broadcasting gorilla/websocket backend (bp_backend_test.go), fast
// gorilla clients that check every sequence number, and slow clients on
// raw sockets with a tiny receive window that stop reading and may resume.

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gobwas/ws"
	gorilla "github.com/gorilla/websocket"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/limiter"
	"github.com/sluice-proxy/sluice/proxy"
)

const (
	// bpIOTimeout bounds every read and handshake.
	bpIOTimeout = 5 * time.Second
	// bpWaitTimeout bounds every wait for a condition.
	bpWaitTimeout = 8 * time.Second
	// bpSlowRcvBuf and bpSlowMSS shape a slow client's socket before it
	// connects: a 4 KiB receive buffer, and a small MSS so that the kernel
	// sizes sluice's send buffer toward it at ~100 KiB rather than MiBs.
	// Either way the client's window closes once it stops reading; the MSS
	// only makes it close soon.
	bpSlowRcvBuf = 4096
	bpSlowMSS    = 1024
	// bpFrameSlack is more than a frame header adds to a message.
	bpFrameSlack = 14
)

// --- sluice -----------------------------------------------------------------

// bpStartSluice starts sluice (startSluice) in front of upstream with
// warnings-only logs, a 2 s close timeout and options adjusted by configure.
// Its cleanup shuts it down; register it after the backend's and before the
// clients', so that clients go first and the backend last.
func bpStartSluice(t *testing.T, upstream string, configure func(*proxy.Options)) *sluiceUnderTest {
	t.Helper()
	return startSluice(t, upstream, func(o *proxy.Options) {
		o.Logger = o.Logger.Level(zerolog.WarnLevel)
		o.CloseTimeout = 2 * time.Second
		configure(o)
	})
}

// bpEvictions returns sluice's recent evictions by client address, and
// in the order they happened.
func bpEvictions(srv *proxy.Server) (byClient map[string]proxy.Eviction, order []proxy.Eviction) {
	recent := srv.RecentEvictions() // newest first
	byClient = make(map[string]proxy.Eviction, len(recent))
	for i := len(recent) - 1; i >= 0; i-- {
		byClient[recent[i].Client] = recent[i]
		order = append(order, recent[i])
	}
	return byClient, order
}

// bpSession returns the live session of the client at addr.
func bpSession(srv *proxy.Server, addr string) (proxy.SessionInfo, bool) {
	for _, s := range srv.Snapshot() {
		if s.Client == addr {
			return s, true
		}
	}
	return proxy.SessionInfo{}, false
}

// --- waiting and sampling ---------------------------------------------------

// bpSample calls f every interval on its own goroutine until the returned
// stop is called; stop waits for the last call to end.
func bpSample(interval time.Duration, f func()) (stop func()) {
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			f()
			select {
			case <-quit:
				return
			case <-tick.C:
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(quit); <-done }) }
}

// bpMax is a running maximum, safe for concurrent use.
type bpMax struct{ v atomic.Int64 }

func (m *bpMax) note(x int64) {
	for {
		old := m.v.Load()
		if x <= old || m.v.CompareAndSwap(old, x) {
			return
		}
	}
}

func (m *bpMax) get() int64 { return m.v.Load() }

// bpURL names a connection (id) and its message size for the backend.
func bpURL(base, id string, size int) string {
	return fmt.Sprintf("%s/bp?id=%s&size=%d", base, id, size)
}

// --- fast clients -------------------------------------------------------------

// bpFastClient is a gorilla/websocket client that reads continuously and
// checks that every message is whole and follows the one before.
type bpFastClient struct {
	id   string
	size int
	addr string // its local address: how sluice names it
	conn *gorilla.Conn

	first, last, count atomic.Uint64
	maxLatency         atomic.Int64 // ns from the backend's write to receipt, the worst seen
	closing            atomic.Bool
	mu                 sync.Mutex
	err                error // first failure; guarded by mu
	done               chan struct{}
}

func bpDialFast(t *testing.T, base, id string, size int) *bpFastClient {
	t.Helper()
	d := gorilla.Dialer{HandshakeTimeout: bpIOTimeout}
	conn, _, err := d.Dial(bpURL(base, id, size), nil)
	if err != nil {
		t.Fatalf("fast client %s: dial: %v", id, err)
	}
	c := &bpFastClient{id: id, size: size, addr: conn.LocalAddr().String(), conn: conn, done: make(chan struct{})}
	go c.reader()
	t.Cleanup(func() {
		c.closing.Store(true)
		conn.Close()
		<-c.done
	})
	return c
}

// reader is the fast client's read loop.
func (c *bpFastClient) reader() {
	defer close(c.done)
	for {
		c.conn.SetReadDeadline(time.Now().Add(bpIOTimeout))
		_, msg, err := c.conn.ReadMessage()
		if err != nil {
			if !c.closing.Load() {
				c.fail(fmt.Errorf("read after message %d: %w", c.last.Load(), err))
			}
			return
		}
		seq, err := bpParse(msg, c.size)
		if err != nil {
			c.fail(err)
			return
		}
		if lat := time.Now().UnixNano() - int64(binary.BigEndian.Uint64(msg[8:])); lat > c.maxLatency.Load() {
			c.maxLatency.Store(lat)
		}
		if last := c.last.Load(); c.count.Load() > 0 && seq != last+1 {
			c.fail(fmt.Errorf("message %d after %d: a gap or reordering", seq, last))
			return
		}
		if c.count.Load() == 0 {
			c.first.Store(seq)
		}
		c.last.Store(seq)
		c.count.Add(1)
	}
}

func (c *bpFastClient) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
}

func (c *bpFastClient) failed() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// bpDialFastClients opens n fast clients named prefix0, prefix1, ...
func bpDialFastClients(t *testing.T, base, prefix string, n, size int) []*bpFastClient {
	t.Helper()
	out := make([]*bpFastClient, n)
	for i := range out {
		out[i] = bpDialFast(t, base, fmt.Sprintf("%s%d", prefix, i), size)
	}
	return out
}

// bpMaxFastLatency bounds the time from the backend's write of a message
// to its receipt by a fast client, plus one second per 2 MiB of message.
// Generous, for busy CI machines under the race detector; what it catches
// is a fast client held up behind a slow one for as long as the slow one
// is stuck.
const bpMaxFastLatency = 2 * time.Second

// bpWaitFast waits until every fast client that has not failed has
// received message seq.
func bpWaitFast(t *testing.T, fast []*bpFastClient, seq uint64) {
	t.Helper()
	waitFor(t, bpWaitTimeout, fmt.Sprintf("every fast client to receive message %d", seq), func() bool {
		for _, c := range fast {
			if c.failed() == nil && c.last.Load() < seq {
				return false
			}
		}
		return true
	})
}

// bpCheckFast waits for every fast client to receive message final and
// checks that each got every message from its first on, in order, with no
// gap, and none late: a slow client elsewhere must not have cost them
// anything.
func bpCheckFast(t *testing.T, b *bpBackend, fast []*bpFastClient, final uint64) {
	t.Helper()
	bpWaitFast(t, fast, final)
	var worst time.Duration
	for _, c := range fast {
		if err := c.failed(); err != nil {
			t.Errorf("fast client %s: %v", c.id, err)
			continue
		}
		lat := time.Duration(c.maxLatency.Load())
		worst = max(worst, lat)
		if limit := bpMaxFastLatency + time.Duration(c.size)*time.Second/(2<<20); lat > limit {
			t.Errorf("fast client %s: a message took %v to arrive, more than %v", c.id, lat, limit)
		}
		bc := b.Conn(c.id)
		if got := c.first.Load(); got != bc.first {
			t.Errorf("fast client %s: first message %d, want %d", c.id, got, bc.first)
		}
		if got, want := c.count.Load(), final-bc.first+1; got != want {
			t.Errorf("fast client %s: received %d messages, want %d (%d..%d)", c.id, got, want, bc.first, final)
		}
		if code := bc.CloseCode(); code != 0 {
			t.Errorf("fast client %s: its upstream leg was closed with %d", c.id, code)
		}
	}
	t.Logf("%d fast clients got messages up to %d, the slowest in %v", len(fast), final, worst.Round(time.Millisecond))
}

// --- slow clients -------------------------------------------------------------

// bpSlowSocket shapes a slow client's socket before it connects.
func bpSlowSocket(network, address string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, bpSlowRcvBuf)
		if serr == nil {
			serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, bpSlowMSS)
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// bpRawClient is a slow client: a raw socket with a tiny receive window,
// upgraded with gobwas/ws, that reads nothing until Resume. From then on
// it reads frame by frame, assembles messages and fails on a torn one
// (a continuation without a start, or a new message inside another).
type bpRawClient struct {
	id   string
	size int
	// bigSeq, if not 0, is a message of bigSize bytes (the backend's ?big=).
	bigSeq  uint64
	bigSize int
	addr    string // its local address: how sluice names it
	conn    net.Conn
	br      *bufio.Reader

	last     atomic.Uint64 // last sequence number received
	stopping atomic.Bool
	done     chan struct{} // closed when the reader ends; nil until Resume

	mu        sync.Mutex
	seqs      []uint64 // every message received, in order; guarded by mu
	frames    []int    // frames of each; guarded by mu
	closeCode int      // close code received; 0 none; guarded by mu
	err       error    // first failure; guarded by mu
}

func bpDialSlow(t *testing.T, base, id string, size int) *bpRawClient {
	t.Helper()
	return bpDialSlowURL(t, bpURL(base, id, size), id, size)
}

// bpDialSlowURL is bpDialSlow with the URL given.
func bpDialSlowURL(t *testing.T, u, id string, size int) *bpRawClient {
	t.Helper()
	nd := net.Dialer{Timeout: bpIOTimeout, Control: bpSlowSocket}
	d := ws.Dialer{Timeout: bpIOTimeout, NetDial: nd.DialContext}
	conn, br, _, err := d.Dial(context.Background(), u)
	if err != nil {
		t.Fatalf("slow client %s: dial: %v", id, err)
	}
	if br == nil {
		br = bufio.NewReaderSize(conn, 4096)
	}
	c := &bpRawClient{id: id, size: size, addr: conn.LocalAddr().String(), conn: conn, br: br}
	t.Cleanup(func() {
		c.stopping.Store(true)
		conn.Close()
		if c.done != nil {
			<-c.done
		}
	})
	return c
}

// Resume starts reading.
func (c *bpRawClient) Resume() {
	c.done = make(chan struct{})
	go c.reader()
}

// Stop ends reading and waits for the reader.
func (c *bpRawClient) Stop() {
	c.stopping.Store(true)
	c.conn.SetReadDeadline(time.Now())
	<-c.done
}

// Closed reports whether the reader has ended.
func (c *bpRawClient) Closed() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// bpWaitSlow waits until every slow client has received message seq or its
// reader has ended; what names the wait in the failure.
func bpWaitSlow(t *testing.T, slow []*bpRawClient, seq uint64, what string) {
	t.Helper()
	waitFor(t, bpWaitTimeout, what, func() bool {
		for _, c := range slow {
			if c.last.Load() < seq && !c.Closed() {
				return false
			}
		}
		return true
	})
}

func (c *bpRawClient) result() (seqs []uint64, frames []int, closeCode int, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.seqs), slices.Clone(c.frames), c.closeCode, c.err
}

// reader reads messages until a close frame, a failure or Stop.
func (c *bpRawClient) reader() {
	defer close(c.done)
	for {
		// Stop's deadline can fall just before readMessage sets the next
		// one: with messages flowing, only this look ends the reader.
		if c.stopping.Load() {
			return
		}
		payload, frames, err := c.readMessage()
		var cf bpCloseFrame
		switch {
		case errors.As(err, &cf):
			c.mu.Lock()
			c.closeCode = int(cf.code)
			c.mu.Unlock()
			return
		case err != nil:
			if !c.stopping.Load() {
				c.fail(fmt.Errorf("after message %d: %w", c.last.Load(), err))
			}
			return
		}
		want := c.size
		if c.bigSeq != 0 && len(payload) >= 8 && binary.BigEndian.Uint64(payload) == c.bigSeq {
			want = c.bigSize
		}
		seq, err := bpParse(payload, want)
		if err != nil {
			c.fail(err)
			return
		}
		c.mu.Lock()
		if n := len(c.seqs); n > 0 && seq <= c.seqs[n-1] {
			c.mu.Unlock()
			c.fail(fmt.Errorf("message %d after %d: out of order", seq, c.seqs[n-1]))
			return
		}
		c.seqs = append(c.seqs, seq)
		c.frames = append(c.frames, frames)
		c.mu.Unlock()
		c.last.Store(seq)
	}
}

func (c *bpRawClient) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
}

// bpCloseFrame is a close frame the raw client received.
type bpCloseFrame struct {
	code       ws.StatusCode
	midMessage bool // it interrupted a fragmented message
}

func (e bpCloseFrame) Error() string {
	if e.midMessage {
		return fmt.Sprintf("close frame %d inside a fragmented message", e.code)
	}
	return fmt.Sprintf("close frame %d", e.code)
}

// readMessage reads the frames of one data message, with a read deadline.
func (c *bpRawClient) readMessage() (payload []byte, frames int, err error) {
	c.conn.SetReadDeadline(time.Now().Add(bpIOTimeout))
	inMsg := false
	for {
		h, err := ws.ReadHeader(c.br)
		if err != nil {
			return nil, frames, fmt.Errorf("frame header: %w", err)
		}
		if h.Masked {
			return nil, frames, errors.New("masked frame from sluice")
		}
		if h.Length > 64<<20 {
			return nil, frames, fmt.Errorf("frame of %d bytes", h.Length)
		}
		p := make([]byte, h.Length)
		if _, err := io.ReadFull(c.br, p); err != nil {
			return nil, frames, fmt.Errorf("frame payload: %w", err)
		}
		switch {
		case h.OpCode == ws.OpClose:
			cf := bpCloseFrame{code: ws.StatusNoStatusRcvd, midMessage: inMsg}
			if len(p) >= 2 {
				cf.code = ws.StatusCode(binary.BigEndian.Uint16(p))
			}
			return nil, frames, cf
		case h.OpCode.IsControl():
			continue
		case h.OpCode == ws.OpContinuation:
			if !inMsg {
				return nil, frames, errors.New("torn message: a continuation frame with no message started")
			}
		default:
			if inMsg {
				return nil, frames, fmt.Errorf("torn message: a new %v message began after %d frames of another", h.OpCode, frames)
			}
			inMsg = true
		}
		payload = append(payload, p...)
		frames++
		if h.Fin {
			return payload, frames, nil
		}
	}
}

// --- tests ----------------------------------------------------------------------

// TestBackpressureEvict: under the evict policy, slow clients are closed
// with 1013 once their queue reaches MaxBytes and their upstream legs with
// 1001, while 95 fast clients get every message; sluice's queued bytes
// stay within the per-client bound throughout.
//
// The slow clients get 4 KiB messages and the fast ones 512 bytes, one
// every 20 ms, so that a slow client fills its 32 KiB in about half a
// second while a fast client would have to stall for more than a second
// (a busy CI machine) before its own queue came near the bound.
func TestBackpressureEvict(t *testing.T) {
	const (
		fastN, slowN       = 95, 5
		fastSize, slowSize = 512, 4096
		maxBytes           = 32 << 10
		ceiling            = 1 << 20 // set, but above what the per-client bounds allow the slow clients
	)
	b := bpNewBackend(t, bpBackendConfig{Size: fastSize, Interval: 20 * time.Millisecond})
	s := bpStartSluice(t, b.url, func(o *proxy.Options) {
		o.Queue = limiter.Config{Policy: limiter.Evict, MaxMessages: 1000, MaxBytes: maxBytes}
		o.Budget = limiter.BudgetConfig{Ceiling: ceiling}
		o.WriteTimeout = 5 * time.Second // longer than the test takes to resume the slow clients
		o.CloseTimeout = 5 * time.Second
	})
	slow := make([]*bpRawClient, slowN)
	for i := range slow {
		slow[i] = bpDialSlow(t, s.url, fmt.Sprintf("slow%d", i), slowSize)
	}
	fast := bpDialFastClients(t, s.url, "fast", fastN, fastSize)
	waitFor(t, bpWaitTimeout, "the backend to accept every connection", func() bool { return b.Conns() == fastN+slowN })

	var peak bpMax
	stopSampling := bpSample(2*time.Millisecond, func() { peak.note(s.srv.Budget().Stats().QueuedBytes) })
	defer stopSampling()
	began := time.Now()
	b.StartPublishing()

	waitFor(t, bpWaitTimeout, "every slow client to be evicted", func() bool {
		ev, _ := bpEvictions(s.srv)
		for _, c := range slow {
			if _, ok := ev[c.addr]; !ok {
				return false
			}
		}
		return true
	})
	evictedAfter := time.Since(began)
	// Resume at once: the 1013 waits behind the write that the full
	// window blocks.
	for _, c := range slow {
		c.Resume()
	}
	waitFor(t, bpWaitTimeout, "the backend to see every slow client's upstream leg close", func() bool {
		for _, c := range slow {
			if b.Conn(c.id).CloseCode() == 0 {
				return false
			}
		}
		return true
	})
	waitFor(t, bpWaitTimeout, "every slow client's reader to end", func() bool {
		for _, c := range slow {
			if !c.Closed() {
				return false
			}
		}
		return true
	})
	final := b.StopPublishing()
	bpCheckFast(t, b, fast, final)
	stopSampling()

	ev, _ := bpEvictions(s.srv)
	for _, c := range slow {
		e := ev[c.addr]
		if e.Reason != "slow" {
			t.Errorf("slow client %s: evicted for %q, want \"slow\"", c.id, e.Reason)
		}
		// The bound holds for sluice's own queue. The kernel's share is
		// counted too, as last sampled (every 50 ms): before the first
		// sample the kernel may take more than the bound (README).
		if own := e.QueueBytes - e.UnsentBytes; own > maxBytes {
			t.Errorf("slow client %s: evicted with %d bytes in its queue, above MaxBytes %d", c.id, own, maxBytes)
		}
		t.Logf("slow client %s: evicted with %d bytes counted, %d of them unsent in the kernel", c.id, e.QueueBytes, e.UnsentBytes)
		if code := b.Conn(c.id).CloseCode(); code != int(ws.StatusGoingAway) {
			t.Errorf("slow client %s: backend saw its upstream leg close with %d, want 1001", c.id, code)
		}
		seqs, _, code, err := c.result()
		if err != nil {
			t.Errorf("slow client %s: %v", c.id, err)
		}
		if code != int(bpTryAgainLater) {
			t.Errorf("slow client %s: close code %d, want 1013", c.id, code)
		}
		// What it got before the close is a prefix of the stream: whole
		// messages, none skipped.
		first := b.Conn(c.id).first
		for i, seq := range seqs {
			if seq != first+uint64(i) {
				t.Errorf("slow client %s: message %d is %d, want %d", c.id, i, seq, first+uint64(i))
				break
			}
		}
	}
	for _, c := range fast {
		if e, ok := ev[c.addr]; ok {
			t.Errorf("fast client %s evicted: %+v", c.id, e)
		}
	}
	clients := int64(fastN + slowN)
	if p := peak.get(); p > clients*maxBytes || p > ceiling+slowSize+bpFrameSlack {
		t.Errorf("queued bytes peaked at %d, above min(%d clients × MaxBytes %d, Ceiling %d + one message)", p, clients, maxBytes, ceiling)
	}
	t.Logf("%d messages; slow clients evicted within %v; queued bytes peaked at %d", final, evictedAfter.Round(time.Millisecond), peak.get())
}

// bpTryAgainLater is 1013 Try Again Later, the close code of an eviction.
const bpTryAgainLater = ws.StatusCode(1013)

// TestBackpressureDrop: under the drop policy with MaxMessages 10 and
// KeepNewest 3, slow clients that stop reading lose old messages, never
// part of one; once they resume they get whole messages in order, ending
// with the newest ones the backend sent. Every third message is
// fragmented by the backend.
//
// MaxMessages counts messages, whatever their size, so the fast clients'
// margin is time: at one message per 50 ms a fast client must stall for
// half a second before it loses anything. The slow clients get 16 KiB
// messages, which fill the kernel's buffers in a few messages.
func TestBackpressureDrop(t *testing.T) {
	const (
		fastN, slowN       = 45, 5
		fastSize, slowSize = 512, 16 << 10
		keep               = 3
	)
	b := bpNewBackend(t, bpBackendConfig{Size: fastSize, Interval: 50 * time.Millisecond, FragmentEvery: 3})
	s := bpStartSluice(t, b.url, func(o *proxy.Options) {
		o.Queue = limiter.Config{Policy: limiter.Drop, MaxMessages: 10, KeepNewest: keep, MaxBytes: 1 << 20}
		o.WriteTimeout = 10 * time.Second
	})
	slow := make([]*bpRawClient, slowN)
	for i := range slow {
		slow[i] = bpDialSlow(t, s.url, fmt.Sprintf("slow%d", i), slowSize)
	}
	fast := bpDialFastClients(t, s.url, "fast", fastN, fastSize)
	waitFor(t, bpWaitTimeout, "the backend to accept every connection", func() bool { return b.Conns() == fastN+slowN })
	b.StartPublishing()

	waitFor(t, bpWaitTimeout, "sluice to drop messages for the slow clients", func() bool {
		return s.srv.Budget().Stats().DroppedTotal >= 10*slowN
	})
	final := b.StopPublishing()
	// Dropping never blocks sluice's reader, so the backend gets every
	// message out on every leg, the slow ones' included.
	waitFor(t, bpWaitTimeout, fmt.Sprintf("the backend to write message %d on every leg", final), func() bool {
		for _, c := range slow {
			if b.Conn(c.id).LastSeq() != final {
				return false
			}
		}
		return true
	})
	for _, c := range slow {
		c.Resume()
	}
	bpWaitSlow(t, slow, final, fmt.Sprintf("every slow client to receive message %d", final))
	for _, c := range slow {
		c.Stop()
	}
	bpCheckFast(t, b, fast, final)

	if d := s.srv.Budget().Stats().DroppedTotal; d == 0 {
		t.Errorf("Stats().DroppedTotal = 0 after the slow clients fell behind")
	}
	for _, c := range slow {
		seqs, frames, code, err := c.result()
		if err != nil {
			t.Errorf("slow client %s: %v", c.id, err)
		}
		if code != 0 {
			t.Errorf("slow client %s: closed with %d; the drop policy keeps it", c.id, code)
		}
		if len(seqs) == 0 {
			t.Errorf("slow client %s: received nothing", c.id)
			continue
		}
		first := b.Conn(c.id).first
		if n := uint64(len(seqs)); n >= final-first+1 {
			t.Errorf("slow client %s: received all %d messages; nothing was dropped for it", c.id, n)
		}
		if last := seqs[len(seqs)-1]; last != final {
			t.Errorf("slow client %s: last message %d, want the newest, %d", c.id, last, final)
		}
		// The newest messages survive. The queue keeps KeepNewest of them
		// (TestBackpressureDropKeepsNewestBehindPartialMessage checks the
		// exact number in the case where it falls short); here, the newest
		// two at least.
		if n := keep - 1; len(seqs) >= n {
			tail := seqs[len(seqs)-n:]
			for i, seq := range tail {
				if want := final - uint64(n-1-i); seq != want {
					t.Errorf("slow client %s: its last %d messages are %v, want the newest ones, ending at %d", c.id, n, tail, final)
					break
				}
			}
		}
		fragmented := 0
		for i, seq := range seqs {
			if seq%3 == 0 && frames[i] > 1 {
				fragmented++
			}
		}
		if fragmented == 0 {
			t.Errorf("slow client %s: no fragmented message among its %d; the test did not exercise fragments", c.id, len(seqs))
		}
		t.Logf("slow client %s: %d of %d messages, %d of them fragmented and whole", c.id, len(seqs), final-first+1, fragmented)
	}
}

// TestBackpressureDropKeepsNewestBehindPartialMessage: the drop policy
// must keep the newest KeepNewest messages even while the writer is in the
// middle of an older one. The slow client's first message is 1 MiB in
// 64 KiB frames, far more than the socket buffers hold, so its writer is
// stuck inside it (and must finish it whole: it cannot be dropped); then
// messages are published one at a time until the first drop, and the
// client resumes.
func TestBackpressureDropKeepsNewestBehindPartialMessage(t *testing.T) {
	const (
		size = 1024
		big  = 1 << 20
		keep = 3
	)
	b := bpNewBackend(t, bpBackendConfig{Size: size})
	s := bpStartSluice(t, b.url, func(o *proxy.Options) {
		o.Queue = limiter.Config{Policy: limiter.Drop, MaxMessages: 10, KeepNewest: keep, MaxBytes: 4 << 20}
		o.WriteTimeout = 10 * time.Second
	})
	slow := bpDialSlowURL(t, fmt.Sprintf("%s&big=%d", bpURL(s.url, "slow", size), big), "slow", size)
	fast := bpDialFastClients(t, s.url, "fast", 2, size)
	waitFor(t, bpWaitTimeout, "the backend to accept every connection", func() bool { return b.Conns() == 3 })
	slow.bigSeq, slow.bigSize = b.Conn(slow.id).first, big

	// progress grows by one for each message sluice has taken from the
	// backend for the slow client: queued, or queued after dropping older
	// ones.
	progress := func() int {
		si, _ := bpSession(s.srv, slow.addr)
		return si.QueueMessages + int(s.srv.Budget().Stats().DroppedTotal)
	}
	b.Publish(1)
	waitFor(t, bpWaitTimeout, "the backend to write the big message", func() bool { return b.Conn(slow.id).LastSeq() == 1 })
	for k := 2; s.srv.Budget().Stats().DroppedTotal == 0; k++ {
		if k > 50 {
			t.Fatalf("no drop after %d messages", k-1)
		}
		b.Publish(1)
		waitFor(t, bpWaitTimeout, fmt.Sprintf("sluice to take message %d for the slow client", k), func() bool { return progress() >= k })
		if k == 2 {
			// The premise: the big message is still being written.
			if si, _ := bpSession(s.srv, slow.addr); si.QueueMessages != 2 {
				t.Fatalf("after two messages the slow client's queue holds %d; want 2, the first unfinished", si.QueueMessages)
			}
		}
	}
	final := b.Latest()
	dropped := s.srv.Budget().Stats().DroppedTotal
	si, _ := bpSession(s.srv, slow.addr)
	slow.Resume()
	waitFor(t, bpWaitTimeout, fmt.Sprintf("the slow client to receive message %d", final), func() bool {
		return slow.last.Load() >= final || slow.Closed()
	})
	slow.Stop()
	bpCheckFast(t, b, fast, final)

	seqs, frames, code, err := slow.result()
	if err != nil {
		t.Fatalf("slow client: %v", err)
	}
	if code != 0 {
		t.Errorf("slow client closed with %d", code)
	}
	t.Logf("published %d; sluice dropped %d and queued %d messages (%d bytes); the client got %v", final, dropped, si.QueueMessages, si.QueueBytes, seqs)
	if len(seqs) == 0 || seqs[0] != 1 || frames[0] < 2 {
		t.Fatalf("the client got %v (frames %v); want the big message first, whole, in several frames", seqs, frames)
	}
	want := make([]uint64, 0, keep)
	for seq := final - keep + 1; seq <= final; seq++ {
		want = append(want, seq)
	}
	if len(seqs) < keep+1 || !slices.Equal(seqs[len(seqs)-keep:], want) {
		t.Errorf("the client got %v: want the unfinished message 1, then the newest KeepNewest=%d, %v", seqs, keep, want)
	}
}

// TestBackpressurePause: under the pause policy, sluice stops reading a
// slow client's upstream leg once its queue is full, until the backend's
// own writes to that leg block, while the other connections go on; the
// queue stays within MaxMessages, and once the client resumes it gets
// every message the backend wrote, in order.
func TestBackpressurePause(t *testing.T) {
	const (
		fastN, slowN = 47, 3
		size         = 1024
		maxMessages  = 10
	)
	b := bpNewBackend(t, bpBackendConfig{Size: size, Interval: 10 * time.Millisecond, SendBuffer: 8192})
	s := bpStartSluice(t, b.url, func(o *proxy.Options) {
		o.Queue = limiter.Config{Policy: limiter.Pause, MaxMessages: maxMessages, MaxBytes: 1 << 20}
		o.UpstreamReadBuffer = 4096
		o.WriteTimeout = 15 * time.Second // the slow clients' writes must not time out
	})
	slow := make([]*bpRawClient, slowN)
	for i := range slow {
		slow[i] = bpDialSlow(t, s.url, fmt.Sprintf("slow%d", i), size)
	}
	fast := bpDialFastClients(t, s.url, "fast", fastN, size)
	waitFor(t, bpWaitTimeout, "the backend to accept every connection", func() bool { return b.Conns() == fastN+slowN })

	var depth bpMax
	var missing atomic.Int32
	stopSampling := bpSample(2*time.Millisecond, func() {
		snap := s.srv.Snapshot()
		for _, c := range slow {
			i := slices.IndexFunc(snap, func(si proxy.SessionInfo) bool { return si.Client == c.addr })
			if i < 0 {
				missing.Add(1)
				continue
			}
			depth.note(int64(snap[i].QueueMessages))
		}
	})
	defer stopSampling()
	b.StartPublishing()

	const blocked = 500 * time.Millisecond
	waitFor(t, bpWaitTimeout, "the backend's writes to every slow leg to block for "+blocked.String(), func() bool {
		for _, c := range slow {
			if b.Conn(c.id).BlockedFor() <= blocked {
				return false
			}
		}
		return true
	})
	// While those writes stay blocked, the fast clients keep up.
	mark := b.Latest()
	bpWaitFast(t, fast, mark)
	for _, c := range slow {
		bc := b.Conn(c.id)
		if bc.BlockedFor() <= blocked {
			t.Errorf("slow client %s: the backend's write unblocked while the client was not reading", c.id)
		}
		si, ok := bpSession(s.srv, c.addr)
		if !ok {
			t.Fatalf("slow client %s: no session in Snapshot", c.id)
		}
		if !si.Paused {
			t.Errorf("slow client %s: Snapshot says not paused: %+v", c.id, si)
		}
		t.Logf("slow client %s: backend wrote %d messages and has been blocked for %v; sluice queues %d messages, %d bytes",
			c.id, bc.Written(), bc.BlockedFor().Round(time.Millisecond), si.QueueMessages, si.QueueBytes)
	}
	if st := s.srv.Budget().Stats(); st.Paused < slowN {
		t.Errorf("Stats().Paused = %d, want at least %d", st.Paused, slowN)
	}

	// Resume under load, then stop and compare with what the backend wrote.
	for _, c := range slow {
		c.Resume()
	}
	resumedAt := b.Latest()
	bpWaitSlow(t, slow, resumedAt, "the slow clients to catch up with the live stream")
	final := b.StopPublishing()
	bpWaitSlow(t, slow, final, fmt.Sprintf("every slow client to receive message %d", final))
	for _, c := range slow {
		c.Stop()
	}
	stopSampling()
	bpCheckFast(t, b, fast, final)
	waitFor(t, bpWaitTimeout, "the backend to finish writing to the slow legs", func() bool {
		for _, c := range slow {
			if bc := b.Conn(c.id); bc.Written() != final-bc.first+1 || bc.BlockedFor() != 0 {
				return false
			}
		}
		return true
	})

	if d := depth.get(); d > maxMessages {
		t.Errorf("a slow client's queue held %d messages, above MaxMessages %d", d, maxMessages)
	}
	if n := missing.Load(); n > 0 {
		t.Errorf("a slow client's session was missing from Snapshot %d times; the pause policy must keep it", n)
	}
	for _, c := range slow {
		bc := b.Conn(c.id)
		seqs, _, code, err := c.result()
		if err != nil {
			t.Errorf("slow client %s: %v", c.id, err)
		}
		if code != 0 {
			t.Errorf("slow client %s: closed with %d", c.id, code)
		}
		if bc.LastSeq() != final || bc.BlockedFor() != 0 {
			t.Errorf("slow client %s: the backend has written up to %d (blocked %v), want %d and unblocked", c.id, bc.LastSeq(), bc.BlockedFor(), final)
		}
		if got, want := uint64(len(seqs)), bc.Written(); got != want {
			t.Errorf("slow client %s: received %d messages, the backend wrote %d", c.id, got, want)
		}
		for i, seq := range seqs {
			if seq != bc.first+uint64(i) {
				t.Errorf("slow client %s: message %d is %d, want %d: lost or reordered", c.id, i, seq, bc.first+uint64(i))
				break
			}
		}
	}
	t.Logf("%d messages; slow queues peaked at %d messages", final, depth.get())
}

// TestBackpressureGlobalCeiling: three slow clients whose queues settle at
// 160, 320 and 640 KiB (pause policy, MaxMessages 10, message sizes 16, 32
// and 64 KiB) against a 700 KiB ceiling: the guard evicts the largest
// first, with reason global_ceiling, and the other two stay.
func TestBackpressureGlobalCeiling(t *testing.T) {
	const (
		fastN       = 20
		size        = 512
		maxMessages = 10
		ceiling     = 700 << 10
		// One publication per interval, well over the guard's reaction
		// time (two GuardIntervals), so that the ceiling is overshot by
		// at most one publication.
		interval = 250 * time.Millisecond
	)
	sizes := []int{16 << 10, 32 << 10, 64 << 10}
	b := bpNewBackend(t, bpBackendConfig{Size: size, Interval: interval})
	s := bpStartSluice(t, b.url, func(o *proxy.Options) {
		o.Queue = limiter.Config{Policy: limiter.Pause, MaxMessages: maxMessages, MaxBytes: 8 << 20}
		o.Budget = limiter.BudgetConfig{Ceiling: ceiling}
		o.WriteTimeout = 15 * time.Second
		// What the kernel holds for each stalled client counts toward the
		// ceiling too: a fixed send buffer (the kernel doubles it) keeps
		// that share at most 64 KiB a client, so the two smaller clients
		// (160 + 320 KiB queued) fit under the ceiling with theirs and the
		// largest (640 KiB) does not.
		o.ClientWriteBuffer = 32 << 10
	})
	slow := make([]*bpRawClient, len(sizes))
	for i, sz := range sizes {
		slow[i] = bpDialSlow(t, s.url, fmt.Sprintf("slow%dk", sz>>10), sz)
	}
	smallest, middle, largest := slow[0], slow[1], slow[2]
	fast := bpDialFastClients(t, s.url, "fast", fastN, size)
	waitFor(t, bpWaitTimeout, "the backend to accept every connection", func() bool { return b.Conns() == fastN+len(sizes) })

	var peak, peakAfter bpMax
	var evicted atomic.Bool
	stopSampling := bpSample(2*time.Millisecond, func() {
		q := s.srv.Budget().Stats().QueuedBytes
		peak.note(q)
		if evicted.Load() {
			peakAfter.note(q)
		}
	})
	defer stopSampling()
	b.StartPublishing()

	waitFor(t, bpWaitTimeout, "a global_ceiling eviction", func() bool {
		_, order := bpEvictions(s.srv)
		return len(order) > 0
	})
	// Let the guard's eviction take effect before measuring against the
	// ceiling: the evicted queue is discarded as it is evicted, and what
	// the kernel holds for the stalled client is freed when its socket is
	// reset, within a second (README, lossless endings).
	waitFor(t, bpWaitTimeout, "the evicted client's upstream leg to close and its session to end", func() bool {
		ev, _ := bpEvictions(s.srv)
		for _, c := range slow {
			if _, ok := ev[c.addr]; ok {
				if _, live := bpSession(s.srv, c.addr); live || b.Conn(c.id).CloseCode() == 0 {
					return false
				}
			}
		}
		return true
	})
	evicted.Store(true)
	// The survivors fill to their high water and stay paused there...
	waitFor(t, bpWaitTimeout, "the other slow clients' queues to fill", func() bool {
		for _, c := range []*bpRawClient{smallest, middle} {
			if si, ok := bpSession(s.srv, c.addr); ok && si.QueueMessages < maxMessages {
				return false
			}
		}
		return true
	})
	// ... for a few more publications, that is several guard rounds.
	mark := b.Latest() + 3
	bpWaitFast(t, fast, mark)
	stopSampling()

	_, order := bpEvictions(s.srv)
	if len(order) == 0 || order[0].Client != largest.addr {
		t.Errorf("first eviction %+v, want the largest queue's client %s (%s)", order, largest.id, largest.addr)
	}
	for _, e := range order {
		if e.Reason != "global_ceiling" {
			t.Errorf("eviction %+v: reason %q, want global_ceiling", e, e.Reason)
		}
	}
	for _, c := range []*bpRawClient{smallest, middle} {
		if _, ok := bpSession(s.srv, c.addr); !ok {
			ev, _ := bpEvictions(s.srv)
			t.Errorf("client %s (%d-byte messages) is gone (eviction %+v); only the largest queue had to go", c.id, c.size, ev[c.addr])
		}
		if code := b.Conn(c.id).CloseCode(); code != 0 {
			t.Errorf("client %s: its upstream leg closed with %d", c.id, code)
		}
	}
	if code := b.Conn(largest.id).CloseCode(); code != int(ws.StatusGoingAway) {
		t.Errorf("client %s: backend saw its upstream leg close with %d, want 1001", largest.id, code)
	}
	for _, c := range fast {
		if _, ok := bpSession(s.srv, c.addr); !ok {
			t.Errorf("fast client %s is gone", c.id)
		}
	}
	// One publication: one message to every connection.
	onePublication := int64(fastN*(size+bpFrameSlack) + (16+32+64)<<10 + 3*bpFrameSlack)
	if p := peak.get(); p > ceiling+onePublication {
		t.Errorf("queued bytes peaked at %d, above the ceiling %d by more than one publication (%d)", p, ceiling, onePublication)
	}
	if p := peakAfter.get(); p > ceiling {
		t.Errorf("queued bytes reached %d after the eviction, above the ceiling %d", p, ceiling)
	}

	final := b.StopPublishing()
	bpCheckFast(t, b, fast, final)
	t.Logf("evictions %+v; queued bytes peaked at %d, %d after the eviction", order, peak.get(), peakAfter.get())
}

// TestBackpressureSlowRatio: 22 clients, 6 of them stalled one after
// another, with a slow ratio of 0.05 (the floor of 4 slow clients allowed)
// and a per-client bound that never fires: the two that stalled first are
// evicted for slow_ratio, first the first, the other four stay although
// they are slow, and the fast clients, never slow, lose nothing.
func TestBackpressureSlowRatio(t *testing.T) {
	const (
		fastN   = 16
		size    = 512
		slowAge = time.Second
	)
	// Six clients read at first and stop one after another, 600 ms apart:
	// slow[0] stalls first. One message per 80 ms. The gap is wide: a
	// stopped client's kernel may still take a few bytes for a while (its
	// 4 KiB receive queue filling, then collapsing), each restarting its
	// stall clock, and 300 ms let two clients swap order under the whole
	// suite's load (once in three runs).
	const nSlow = 6
	b := bpNewBackend(t, bpBackendConfig{Size: size, Interval: 80 * time.Millisecond})
	s := bpStartSluice(t, b.url, func(o *proxy.Options) {
		o.Queue = limiter.Config{Policy: limiter.Evict, MaxMessages: 100000, MaxBytes: 256 << 20, SlowAge: slowAge}
		o.Budget = limiter.BudgetConfig{SlowRatio: 0.05}
		o.WriteTimeout = time.Minute
	})
	slow := make([]*bpRawClient, nSlow)
	for i := range slow {
		slow[i] = bpDialSlow(t, s.url, fmt.Sprintf("slow%d", i), size)
		slow[i].Resume()
	}
	fast := bpDialFastClients(t, s.url, "fast", fastN, size)
	waitFor(t, bpWaitTimeout, "the backend to accept every connection", func() bool { return b.Conns() == fastN+nSlow })
	if st := s.srv.Budget().Stats(); st.AllowedSlow != limiter.MinAllowedSlow {
		t.Errorf("Stats().AllowedSlow = %d with %d connections and ratio 0.05, want the floor %d", st.AllowedSlow, st.Connections, limiter.MinAllowedSlow)
	}
	b.StartPublishing()
	for _, c := range slow {
		time.Sleep(600 * time.Millisecond) // the stalls' order is the test's subject
		c.Stop()
	}

	// The kernel's buffers fill, then SlowAge; more on a machine busy with
	// the rest of the suite.
	waitFor(t, 4*bpWaitTimeout, "two evictions", func() bool {
		_, order := bpEvictions(s.srv)
		return len(order) >= 2
	})
	stayed := slow[2:]
	waitFor(t, bpWaitTimeout, "the four slow clients left to be slow", func() bool {
		for _, c := range stayed {
			if si, ok := bpSession(s.srv, c.addr); ok && !si.Slow {
				return false
			}
		}
		return true
	})
	// They stay, slow, for a few more guard rounds.
	mark := b.Latest() + 4
	bpWaitFast(t, fast, mark)

	_, order := bpEvictions(s.srv)
	var got []string
	for _, e := range order {
		got = append(got, e.Client)
		if e.Reason != "slow_ratio" {
			t.Errorf("eviction %+v: reason %q, want slow_ratio", e, e.Reason)
		}
	}
	want := []string{slow[0].addr, slow[1].addr}
	if !slices.Equal(got, want) {
		t.Errorf("evicted %v, want the longest stalled first: %v (%s, %s)", got, want, slow[0].id, slow[1].id)
	}
	for _, c := range stayed {
		si, ok := bpSession(s.srv, c.addr)
		if !ok {
			t.Errorf("slow client %s was evicted; the floor allows four", c.id)
		} else if !si.Slow {
			t.Errorf("slow client %s: %+v, want slow", c.id, si)
		}
	}
	for _, c := range slow[:2] {
		waitFor(t, bpWaitTimeout, "the backend to see "+c.id+"'s upstream leg close", func() bool { return b.Conn(c.id).CloseCode() != 0 })
		if code := b.Conn(c.id).CloseCode(); code != int(ws.StatusGoingAway) {
			t.Errorf("client %s: backend saw its upstream leg close with %d, want 1001", c.id, code)
		}
	}
	if st := s.srv.Budget().Stats(); st.Slow > st.AllowedSlow {
		t.Errorf("Stats() = %+v: more slow connections than allowed", st)
	}
	final := b.StopPublishing()
	bpCheckFast(t, b, fast, final)
	t.Logf("evictions %+v", order)
}

// TestBackpressureWriteTimeout: with limits that never fire, a client whose
// window is shut is evicted once a write to it outlasts WriteTimeout, in
// every policy; its upstream leg is closed with 1001 and the fast clients
// get their messages whole. Two ways to block the write: one 4 MiB message
// (larger than any socket buffer), which sluice streams from socket to
// socket; and a stream of 4 KiB messages, which it queues and writes in
// batches.
func TestBackpressureWriteTimeout(t *testing.T) {
	const (
		fastN        = 2
		writeTimeout = 500 * time.Millisecond
	)
	cases := []struct {
		name               string
		fastSize, slowSize int
		interval           time.Duration // 0: publish one message
	}{
		{"streamed 4MiB", 4 << 20, 4 << 20, 0},
		{"queued 4KiB", 512, 4 << 10, 10 * time.Millisecond},
	}
	for _, tc := range cases {
		for _, policy := range []limiter.Policy{limiter.Evict, limiter.Drop, limiter.Pause} {
			t.Run(tc.name+"/"+policy.String(), func(t *testing.T) {
				b := bpNewBackend(t, bpBackendConfig{Size: tc.fastSize, Interval: tc.interval})
				s := bpStartSluice(t, b.url, func(o *proxy.Options) {
					o.Queue = limiter.Config{Policy: policy, MaxMessages: 100000, MaxBytes: 256 << 20, KeepNewest: 100000}
					o.WriteTimeout = writeTimeout
					o.CloseTimeout = time.Second
				})
				slow := bpDialSlow(t, s.url, "slow", tc.slowSize)
				fast := bpDialFastClients(t, s.url, "fast", fastN, tc.fastSize)
				waitFor(t, bpWaitTimeout, "the backend to accept every connection", func() bool { return b.Conns() == fastN+1 })

				began := time.Now()
				if tc.interval == 0 {
					b.Publish(1)
				} else {
					b.StartPublishing()
				}
				waitFor(t, bpWaitTimeout, "the slow client's eviction", func() bool {
					ev, _ := bpEvictions(s.srv)
					_, ok := ev[slow.addr]
					return ok
				})
				after := time.Since(began)
				final := b.StopPublishing()
				ev, order := bpEvictions(s.srv)
				if e := ev[slow.addr]; e.Reason != "write_timeout" {
					t.Errorf("slow client evicted for %q, want write_timeout", e.Reason)
				}
				if len(order) != 1 {
					t.Errorf("evictions %+v, want only the slow client's", order)
				}
				if after < writeTimeout {
					t.Errorf("evicted %v after publishing began, before WriteTimeout %v", after, writeTimeout)
				}
				waitFor(t, bpWaitTimeout, "the backend to see the slow client's upstream leg close", func() bool {
					return b.Conn(slow.id).CloseCode() != 0
				})
				if code := b.Conn(slow.id).CloseCode(); code != int(ws.StatusGoingAway) {
					t.Errorf("backend saw the slow client's upstream leg close with %d, want 1001", code)
				}
				bpCheckFast(t, b, fast, final)
				t.Logf("evicted %v after publishing began", after.Round(time.Millisecond))
			})
		}
	}
}
