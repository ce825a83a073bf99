package integration

// TestSoak keeps sluice under constant churn for a while and checks that
// nothing accumulates: a broadcast backend (50 messages of 1 KiB a second)
// behind sluice; clients that keep connecting and leaving (close frames and
// pulled sockets); slow clients that stop reading and must be evicted; fast
// clients that must lose no message while connected; and the backend
// restarted twice on the same port (its clients get 1014 and reconnect).
// Live heap, goroutine stacks and the goroutine count are sampled every
// 500 ms and must be flat after the warm-up; when everything is closed the
// goroutines must be back where they started.
//
// It runs 8 s by default and is skipped with -short. The long run:
//
//	SOAK_DURATION=5m go test -race -count=1 -run TestSoak -timeout 20m ./integration/

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"runtime"
	"runtime/metrics"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/gobwas/ws"
	gorilla "github.com/gorilla/websocket"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/keepalive"
	"github.com/sluice-proxy/sluice/limiter"
	"github.com/sluice-proxy/sluice/proxy"
)

// The soak's shape.
const (
	soakDefaultDuration = 8 * time.Second
	soakMessageSize     = 1 << 10
	soakPublishEvery    = 20 * time.Millisecond // 50 messages a second
	soakSampleEvery     = 500 * time.Millisecond
	soakFastClients     = 4
	soakSlowClients     = 2
	soakChurners        = 3
	soakSlowStall       = 3 * time.Second // a slow client's silence: past the pong timeout and the write timeout
	soakHeapTolerance   = 0.20            // the end's live heap may exceed the warm-up median by this much ...
	soakHeapFloor       = 512 << 10       // ... or by this many bytes, whichever is more
	soakGoroutineSlack  = 50
)

func TestSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("soak: skipped with -short")
	}
	duration := soakDefaultDuration
	if v := os.Getenv("SOAK_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			t.Fatalf("SOAK_DURATION=%q: want a Go duration such as 5m", v)
		}
		duration = d
	}
	baseline := runtime.NumGoroutine()
	began := time.Now()

	backend := soakStartBackend(t)
	sl := startSluice(t, "ws://"+backend.addr, func(o *proxy.Options) {
		o.Logger = zerolog.Nop()
		o.WriteTimeout = time.Second
		o.CloseTimeout = 2 * time.Second
		o.ClientWriteBuffer = 16 << 10 // a stalled client shows within a few messages
		o.Queue = limiter.Config{Policy: limiter.Evict, MaxMessages: 50, SlowAge: time.Second}
		o.Keepalive = keepalive.Config{Interval: time.Second, Timeout: 500 * time.Millisecond}
	})
	srv, base := sl.srv, sl.url

	ctx, cancel := context.WithCancel(context.Background())
	stats := &soakStats{closes: map[string]int{}}
	var loops sync.WaitGroup
	fast := make([]*soakFast, soakFastClients)
	for i := range fast {
		fast[i] = &soakFast{id: i}
		loops.Add(1)
		go func() {
			defer loops.Done()
			fast[i].run(ctx, base, stats)
		}()
	}
	for i := range soakSlowClients {
		loops.Add(1)
		go func() {
			defer loops.Done()
			soakSlowLoop(ctx, base, i, stats)
		}()
	}
	for i := range soakChurners {
		loops.Add(1)
		go func() {
			defer loops.Done()
			soakChurnLoop(ctx, base, i, stats)
		}()
	}

	// Sample until the end, restarting the backend at 40% and 70%.
	var samples []soakSample
	restarts := []time.Duration{duration * 4 / 10, duration * 7 / 10}
	var restartedAt []time.Duration
	var seqAtRestart uint64
	tick := time.NewTicker(soakSampleEvery)
	for time.Since(began) < duration {
		<-tick.C
		if len(restarts) > 0 && time.Since(began) >= restarts[0] {
			restarts = restarts[1:]
			if err := backend.restart(); err != nil {
				t.Errorf("backend restart: %v", err)
			}
			restartedAt = append(restartedAt, time.Since(began))
			// Messages numbered past this come from the new backend.
			seqAtRestart = backend.seq.Load()
		}
		samples = append(samples, soakTakeSample(time.Since(began), srv.Sessions()))
	}
	tick.Stop()
	// On a starved machine the loop can overrun its schedule: make the
	// restarts still due, then let every fast client reconnect (bounded)
	// before winding down, so the checks below test sluice, not the clock.
	for range restarts {
		if err := backend.restart(); err != nil {
			t.Errorf("backend restart: %v", err)
		}
		restartedAt = append(restartedAt, time.Since(began))
		seqAtRestart = backend.seq.Load()
	}
	reconnectBy := time.Now().Add(20 * time.Second)
	for time.Now().Before(reconnectBy) {
		behind := 0
		for _, f := range fast {
			if f.maxSeq.Load() <= seqAtRestart {
				behind++
			}
		}
		if behind == 0 {
			break
		}
		time.Sleep(20 * time.Millisecond) // polling a condition no signal reports
	}

	// Wind down: clients first, then sluice, then the backend.
	cancel()
	if !waitGroupWithin(&loops, 30*time.Second) {
		t.Fatalf("client loops did not end")
	}
	shutCtx, shutCancel := context.WithTimeout(context.Background(), 10*time.Second)
	if err := sl.shutdown(shutCtx); err != nil {
		t.Errorf("sluice Shutdown: %v", err)
	}
	shutCancel()
	backend.close()

	// --- report ------------------------------------------------------------
	soakLogSamples(t, samples)
	evictions := map[string]int{}
	for _, ev := range srv.RecentEvictions() {
		evictions[ev.Reason]++
	}
	var fastMsgs int64
	for _, f := range fast {
		fastMsgs += f.received.Load()
	}
	t.Logf("soak: %v, backend restarted at %v, %d messages published", duration, restartedAt, backend.seq.Load())
	t.Logf("fast clients: %d messages, %d connections, closes seen %v", fastMsgs, stats.fastConns.Load(), stats.closeCounts("fast"))
	t.Logf("slow clients: %d stalls, %d ended by sluice, closes seen %v", stats.slowStalls.Load(), stats.slowClosed.Load(), stats.closeCounts("slow"))
	t.Logf("churners: %d sessions (%d closed normally, %d pulled)", stats.churns.Load(), stats.churnNormal.Load(), stats.churnAbrupt.Load())
	t.Logf("backend: %d connections, upstream legs ended %v, %d kicked for falling behind", backend.accepted.Load(), backend.endCounts(), backend.kicked.Load())
	t.Logf("sluice: recent evictions by reason %v", evictions)

	// --- checks ------------------------------------------------------------
	for _, f := range fast {
		if msg := f.gap(); msg != "" {
			t.Errorf("fast client %d lost messages while connected: %s", f.id, msg)
		}
		if got := f.maxSeq.Load(); got <= seqAtRestart {
			t.Errorf("fast client %d got nothing from the backend after its last restart (last message %d, restart at %d): it did not reconnect", f.id, got, seqAtRestart)
		}
	}
	if n := stats.close("fast", 1014); n < len(restartedAt) {
		t.Errorf("fast clients saw %d closes with 1014, want at least one per backend restart (%d)", n, len(restartedAt))
	}
	if stalls, closed := stats.slowStalls.Load(), stats.slowClosed.Load(); stalls == 0 || closed != stalls {
		t.Errorf("slow clients: %d of %d stalls ended with sluice closing the connection, want all (and at least one)", closed, stalls)
	}
	if stats.churns.Load() == 0 {
		t.Errorf("no churn happened")
	}
	if backend.ends(1001) == 0 || backend.ends(1000) == 0 {
		t.Errorf("backend saw upstream legs end %v, want both 1000 (client closes) and 1001 (clients gone or evicted)", backend.endCounts())
	}
	soakCheckFlat(t, samples)

	// Everything is closed: the goroutines are back where they started.
	deadline := time.Now().Add(10 * time.Second)
	n := runtime.NumGoroutine()
	for n > baseline+5 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		n = runtime.NumGoroutine()
	}
	t.Logf("goroutines: %d before the soak, %d after it", baseline, n)
	if n > baseline+5 {
		buf := make([]byte, 1<<20)
		t.Errorf("goroutines = %d after the soak, want at most %d\n%s", n, baseline+5, buf[:runtime.Stack(buf, true)])
	}
}

// --- samples -------------------------------------------------------------------

// soakSample is the process's live state at one moment, after a GC.
type soakSample struct {
	at         time.Duration
	heap       uint64 // live heap objects, bytes
	stacks     uint64 // goroutine stacks, bytes
	goroutines int
	sessions   int
}

func soakTakeSample(at time.Duration, sessions int) soakSample {
	runtime.GC()
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/memory/classes/heap/stacks:bytes"}}
	metrics.Read(s)
	return soakSample{at: at, heap: s[0].Value.Uint64(), stacks: s[1].Value.Uint64(),
		goroutines: runtime.NumGoroutine(), sessions: sessions}
}

// soakLogSamples logs the series, at most 60 rows of it.
func soakLogSamples(t *testing.T, samples []soakSample) {
	var b strings.Builder
	step := max(1, len(samples)/60)
	fmt.Fprintf(&b, "samples (every %v, %d shown of %d): at, heap+stacks KiB (heap, stacks), goroutines, sessions\n",
		soakSampleEvery*time.Duration(step), (len(samples)+step-1)/step, len(samples))
	for i := 0; i < len(samples); i += step {
		s := samples[i]
		fmt.Fprintf(&b, "  %6.1fs  %6d KiB (%d, %d)  %4d goroutines  %3d sessions\n",
			s.at.Seconds(), (s.heap+s.stacks)>>10, s.heap>>10, s.stacks>>10, s.goroutines, s.sessions)
	}
	t.Log(b.String())
}

// soakCheckFlat compares the end of the run with the warm-up: the median
// of the samples after the first quarter of the run and before its second
// quarter is the reference; the last sample must be within tolerance.
func soakCheckFlat(t *testing.T, samples []soakSample) {
	if len(samples) < 8 {
		t.Errorf("only %d samples: the run is too short to judge", len(samples))
		return
	}
	quarter := len(samples) / 4
	warm := samples[quarter : 2*quarter]
	mem := func(s soakSample) uint64 { return s.heap + s.stacks }
	var heaps []uint64
	var gs []int
	for _, s := range warm {
		heaps = append(heaps, mem(s))
		gs = append(gs, s.goroutines)
	}
	slices.Sort(heaps)
	sort.Ints(gs)
	heap0, g0 := heaps[len(heaps)/2], gs[len(gs)/2]
	last := samples[len(samples)-1]
	heapLimit := heap0 + max(uint64(float64(heap0)*soakHeapTolerance), soakHeapFloor)
	t.Logf("flatness: warm-up median %d KiB, %d goroutines; last %d KiB, %d goroutines (limits %d KiB, %d)",
		heap0>>10, g0, mem(last)>>10, last.goroutines, heapLimit>>10, g0+soakGoroutineSlack)
	if mem(last) > heapLimit {
		t.Errorf("live heap+stacks grew: %d KiB at the end, warm-up median %d KiB (limit %d KiB)", mem(last)>>10, heap0>>10, heapLimit>>10)
	}
	if last.goroutines > g0+soakGoroutineSlack {
		t.Errorf("goroutines grew: %d at the end, warm-up median %d (limit %d)", last.goroutines, g0, g0+soakGoroutineSlack)
	}
}

// --- the broadcast backend -------------------------------------------------------

// soakBackend broadcasts a numbered 1 KiB message to every connection every
// 20 ms, on a fixed port, and can be restarted: its listener and every
// connection closed without a close frame, then a new listener on the same
// port.
type soakBackend struct {
	t        testing.TB
	addr     string
	seq      atomic.Uint64 // last message published, across restarts
	accepted atomic.Int64
	kicked   atomic.Int64 // connections closed for a full outbox
	stopPub  chan struct{}
	pubDone  chan struct{}

	mu       sync.Mutex
	srv      *http.Server                  // guarded by mu
	served   chan struct{}                 // closed when srv's Serve returns; guarded by mu
	conns    map[*soakBackendConn]struct{} // guarded by mu
	downing  bool                          // down is closing every conn; guarded by mu
	endCodes map[int]int                   // how upstream legs ended; guarded by mu
	handlers sync.WaitGroup
}

type soakBackendConn struct {
	c    *gorilla.Conn
	out  chan []byte   // messages to write; the publisher never waits on it
	gone chan struct{} // closed by kick or when the reader ends
	once sync.Once
}

func (c *soakBackendConn) kick() {
	c.once.Do(func() {
		close(c.gone)
		c.c.UnderlyingConn().Close()
	})
}

func soakStartBackend(t *testing.T) *soakBackend {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &soakBackend{t: t, addr: ln.Addr().String(), conns: map[*soakBackendConn]struct{}{},
		endCodes: map[int]int{}, stopPub: make(chan struct{}), pubDone: make(chan struct{})}
	b.serve(ln)
	go b.publisher()
	return b
}

func (b *soakBackend) serve(ln net.Listener) {
	srv := &http.Server{Handler: http.HandlerFunc(b.handle), ReadHeaderTimeout: 5 * time.Second}
	served := make(chan struct{})
	b.mu.Lock()
	b.srv, b.served, b.downing = srv, served, false
	b.mu.Unlock()
	go func() {
		defer close(served)
		srv.Serve(ln)
	}()
}

// down closes the listener and every connection, without close frames,
// and waits for the handlers.
func (b *soakBackend) down() {
	b.mu.Lock()
	srv, served := b.srv, b.served
	b.mu.Unlock()
	srv.Close()
	<-served
	b.mu.Lock()
	b.downing = true
	for c := range b.conns {
		c.kick()
	}
	b.mu.Unlock()
	b.handlers.Wait()
}

// restart takes the backend down and brings it back on the same port.
func (b *soakBackend) restart() error {
	b.down()
	time.Sleep(100 * time.Millisecond)
	var ln net.Listener
	var err error
	for range 50 {
		if ln, err = net.Listen("tcp", b.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("listen again on %s: %w", b.addr, err)
	}
	b.serve(ln)
	return nil
}

func (b *soakBackend) close() {
	close(b.stopPub)
	<-b.pubDone
	b.down()
}

// publisher sends every connection the next message every 20 ms. A
// connection whose outbox is full is closed rather than skipped, so a
// client never sees a gap that the backend made.
func (b *soakBackend) publisher() {
	defer close(b.pubDone)
	tick := time.NewTicker(soakPublishEvery)
	defer tick.Stop()
	for {
		select {
		case <-b.stopPub:
			return
		case <-tick.C:
		}
		msg := make([]byte, soakMessageSize)
		seq := b.seq.Add(1)
		binary.BigEndian.PutUint64(msg, seq)
		for i := 8; i < len(msg); i++ {
			msg[i] = byte('a' + (seq+uint64(i))%26)
		}
		b.mu.Lock()
		for c := range b.conns {
			select {
			case c.out <- msg:
			default:
				b.kicked.Add(1)
				c.kick()
			}
		}
		b.mu.Unlock()
	}
}

// handle is one upstream connection: this goroutine writes, another reads
// (answering pings, and noting how the leg ended).
func (b *soakBackend) handle(w http.ResponseWriter, r *http.Request) {
	b.handlers.Add(1)
	defer b.handlers.Done()
	up := gorilla.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}
	gc, err := up.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	b.accepted.Add(1)
	c := &soakBackendConn{c: gc, out: make(chan []byte, 256), gone: make(chan struct{})}
	b.mu.Lock()
	b.conns[c] = struct{}{}
	if b.downing {
		// Upgraded while down was closing the others.
		c.kick()
	}
	b.mu.Unlock()
	read := make(chan struct{})
	go func() {
		defer close(read)
		for {
			if _, _, err := gc.ReadMessage(); err != nil {
				code := gorilla.CloseAbnormalClosure
				var ce *gorilla.CloseError
				if errors.As(err, &ce) {
					code = ce.Code
				}
				b.mu.Lock()
				b.endCodes[code]++
				b.mu.Unlock()
				c.kick()
				return
			}
		}
	}()
	for done := false; !done; {
		select {
		case msg := <-c.out:
			gc.SetWriteDeadline(time.Now().Add(5 * time.Second))
			if gc.WriteMessage(gorilla.BinaryMessage, msg) != nil {
				c.kick()
				done = true
			}
		case <-c.gone:
			done = true
		}
	}
	<-read
	b.mu.Lock()
	delete(b.conns, c)
	b.mu.Unlock()
	gc.Close()
}

func (b *soakBackend) ends(code int) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.endCodes[code]
}

func (b *soakBackend) endCounts() map[int]int {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make(map[int]int, len(b.endCodes))
	for k, v := range b.endCodes {
		out[k] = v
	}
	return out
}

// --- clients ---------------------------------------------------------------------

// soakStats is what the client loops saw.
type soakStats struct {
	fastConns                        atomic.Int64
	slowStalls, slowClosed           atomic.Int64
	churns, churnNormal, churnAbrupt atomic.Int64

	mu     sync.Mutex
	closes map[string]int // "kind code" → count; guarded by mu
}

func (s *soakStats) noteClose(kind string, code int) {
	s.mu.Lock()
	s.closes[fmt.Sprintf("%s %d", kind, code)]++
	s.mu.Unlock()
}

func (s *soakStats) close(kind string, code int) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closes[fmt.Sprintf("%s %d", kind, code)]
}

func (s *soakStats) closeCounts(kind string) map[int]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[int]int{}
	for k, v := range s.closes {
		var code int
		if n, _ := fmt.Sscanf(k, kind+" %d", &code); n == 1 {
			out[code] += v
		}
	}
	return out
}

// soakPause waits d or until ctx ends, and says whether ctx is still live.
func soakPause(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// soakFast is a coder/websocket client that reads everything and checks
// that the sequence numbers of one connection have no hole. It reconnects
// whenever its connection ends (1014 when the backend restarts).
type soakFast struct {
	id       int
	received atomic.Int64
	maxSeq   atomic.Uint64 // the highest sequence number received

	mu     sync.Mutex
	gapMsg string // the first hole seen; guarded by mu
}

func (f *soakFast) gap() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.gapMsg
}

func (f *soakFast) run(ctx context.Context, base string, stats *soakStats) {
	for ctx.Err() == nil {
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		c, _, err := websocket.Dial(dctx, fmt.Sprintf("%s/fast?n=%d", base, f.id), nil)
		cancel()
		if err != nil {
			// The backend is restarting (sluice answers 502), or the
			// test is ending.
			soakPause(ctx, 50*time.Millisecond)
			continue
		}
		stats.fastConns.Add(1)
		c.SetReadLimit(64 << 10)
		var last uint64
		for {
			_, msg, err := c.Read(ctx)
			if err != nil {
				if ctx.Err() == nil {
					stats.noteClose("fast", int(websocket.CloseStatus(err)))
				}
				break
			}
			if len(msg) != soakMessageSize {
				f.noteGap(fmt.Sprintf("message of %d bytes, want %d", len(msg), soakMessageSize))
				break
			}
			seq := binary.BigEndian.Uint64(msg)
			if last != 0 && seq != last+1 {
				f.noteGap(fmt.Sprintf("message %d after %d", seq, last))
			}
			last = seq
			f.received.Add(1)
			if seq > f.maxSeq.Load() {
				f.maxSeq.Store(seq)
			}
		}
		c.CloseNow()
	}
}

func (f *soakFast) noteGap(msg string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.gapMsg == "" {
		f.gapMsg = msg
	}
}

// soakSlowLoop connects a client with a small receive buffer that reads
// nothing for soakSlowStall: sluice must evict it (1013 for its queue or a
// write timeout, 1001 for pong timeout; the close frame rarely gets
// through a full window) and close the socket. Then it drains what
// arrived, checks the socket is closed, and starts again.
func soakSlowLoop(ctx context.Context, base string, i int, stats *soakStats) {
	small := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4<<10)
		})
		return serr
	}}
	d := ws.Dialer{Timeout: 5 * time.Second, NetDial: small.DialContext}
	for ctx.Err() == nil {
		conn, br, _, err := d.Dial(ctx, fmt.Sprintf("%s/slow?n=%d", base, i))
		if err != nil {
			soakPause(ctx, 50*time.Millisecond)
			continue
		}
		var r io.Reader = conn
		if br != nil {
			r = br
		}
		stalled := soakPause(ctx, soakSlowStall)
		if !stalled {
			conn.Close()
			return
		}
		stats.slowStalls.Add(1)
		// Drain: what the windows held, maybe a close frame, then EOF.
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		code := 0
		for {
			h, err := ws.ReadHeader(r)
			if err != nil {
				if !errors.Is(err, os.ErrDeadlineExceeded) {
					stats.slowClosed.Add(1)
					stats.noteClose("slow", code)
				}
				break
			}
			p := make([]byte, min(h.Length, 1<<20))
			if _, err := io.ReadFull(r, p); err != nil {
				continue // the next ReadHeader reports how it ended
			}
			if h.OpCode == ws.OpClose && len(p) >= 2 {
				code = int(binary.BigEndian.Uint16(p))
			}
		}
		conn.Close()
	}
}

// soakChurnLoop connects a gorilla client, reads a few messages and leaves:
// with a close handshake or by pulling the socket, in turn.
func soakChurnLoop(ctx context.Context, base string, i int, stats *soakStats) {
	rng := rand.New(rand.NewPCG(uint64(i), 7))
	d := gorilla.Dialer{HandshakeTimeout: 5 * time.Second}
	for n := 0; ctx.Err() == nil; n++ {
		c, _, err := d.DialContext(ctx, fmt.Sprintf("%s/churn?n=%d", base, i), nil)
		if err != nil {
			soakPause(ctx, 50*time.Millisecond)
			continue
		}
		stats.churns.Add(1)
		for range 1 + rng.IntN(10) {
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			if _, _, err := c.ReadMessage(); err != nil {
				break
			}
		}
		if n%2 == 0 {
			stats.churnNormal.Add(1)
			c.WriteControl(gorilla.CloseMessage, gorilla.FormatCloseMessage(1000, "bye"), time.Now().Add(2*time.Second))
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			for {
				if _, _, err := c.ReadMessage(); err != nil {
					break
				}
			}
		} else {
			stats.churnAbrupt.Add(1)
		}
		c.Close()
	}
}
