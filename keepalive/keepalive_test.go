package keepalive

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// recPeer records every callback with the bubble's fake time. It answers
// pings with a pong, after pongDelay, while answer is true.
type recPeer struct {
	m         atomic.Pointer[Monitor]
	answer    atomic.Bool
	pongDelay time.Duration // 0: answer from inside SendPing
	onPing    func(m *Monitor)
	onStale   func(m *Monitor)

	mu       sync.Mutex
	pings    []time.Time // guarded by mu
	payloads []string    // guarded by mu
	answered []time.Time // guarded by mu: pings that were answered
	stales   []time.Time // guarded by mu
}

func (p *recPeer) SendPing(payload []byte) {
	now := time.Now()
	pl := string(payload)
	answer := p.answer.Load()
	p.mu.Lock()
	p.pings = append(p.pings, now)
	p.payloads = append(p.payloads, pl)
	if answer {
		p.answered = append(p.answered, now)
	}
	p.mu.Unlock()
	m := p.m.Load()
	if answer {
		if p.pongDelay == 0 {
			m.IsOwnPong([]byte(pl))
		} else {
			go func() {
				time.Sleep(p.pongDelay)
				m.IsOwnPong([]byte(pl))
			}()
		}
	}
	if p.onPing != nil {
		p.onPing(m)
	}
}

func (p *recPeer) Stale() {
	now := time.Now()
	p.mu.Lock()
	p.stales = append(p.stales, now)
	p.mu.Unlock()
	if p.onStale != nil {
		p.onStale(p.m.Load())
	}
}

// snapshot returns copies of what the peer has seen so far.
func (p *recPeer) snapshot() (pings, answered, stales []time.Time, payloads []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]time.Time(nil), p.pings...), append([]time.Time(nil), p.answered...),
		append([]time.Time(nil), p.stales...), append([]string(nil), p.payloads...)
}

// start begins a Monitor on p. Inside a bubble no time passes before the
// caller blocks, so p.m is set before the first callback.
func start(cfg Config, p *recPeer) *Monitor {
	m := Start(cfg, p)
	p.m.Store(m)
	return m
}

// startAnswering starts n Monitors whose peers answer every ping.
func startAnswering(n int, cfg Config) ([]*recPeer, []*Monitor) {
	peers := make([]*recPeer, n)
	monitors := make([]*Monitor, n)
	for i := range peers {
		peers[i] = &recPeer{}
		peers[i].answer.Store(true)
		monitors[i] = start(cfg, peers[i])
	}
	return peers, monitors
}

// settle stops m and lets pending pong goroutines finish, so the bubble can end.
func settle(m *Monitor, cfg Config) {
	m.Stop()
	time.Sleep(2*cfg.Interval + 1)
	synctest.Wait()
}

var testCfg = Config{Interval: 25 * time.Second, Timeout: 10 * time.Second}

func TestFirstPingJitter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const n = 500
		cfg := testCfg
		t0 := time.Now()
		peers, monitors := startAnswering(n, cfg)
		time.Sleep(cfg.Interval + tickOf(cfg.Interval))
		synctest.Wait()
		lo, hi := cfg.Interval, time.Duration(0)
		for i, p := range peers {
			pings, _, _, _ := p.snapshot()
			if len(pings) == 0 {
				t.Fatalf("monitor %d: no ping in the first Interval", i)
			}
			d := pings[0].Sub(t0)
			if max := cfg.Interval + tickOf(cfg.Interval); d <= 0 || d > max {
				t.Fatalf("monitor %d: first ping after %v, want in (0, %v]", i, d, max)
			}
			lo, hi = min(lo, d), max(hi, d)
		}
		// 500 uniform draws all landing in one half has probability ~2^-499.
		if lo > cfg.Interval/4 || hi < 3*cfg.Interval/4 {
			t.Errorf("first pings span [%v, %v], want spread over (0, %v]", lo, hi, cfg.Interval)
		}
		for _, m := range monitors {
			m.Stop()
		}
	})
}

func TestPingsEveryInterval(t *testing.T) {
	for _, pongDelay := range []time.Duration{0, 3 * time.Second} {
		t.Run(fmt.Sprintf("pongDelay=%v", pongDelay), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				cfg := testCfg
				p := &recPeer{pongDelay: pongDelay}
				p.answer.Store(true)
				m := start(cfg, p)
				time.Sleep(10 * cfg.Interval)
				synctest.Wait()
				pings, _, stales, payloads := p.snapshot()

				// First ping in (0, I], then gaps in [0.9I, 1.1I].
				if n := len(pings); n < 9 || n > 12 {
					t.Errorf("%d pings in 10 intervals, want 9..12", n)
				}
				if got := m.PingsSent(); got != uint64(len(pings)) {
					t.Errorf("PingsSent = %d, peer saw %d", got, len(pings))
				}
				// Pings are aligned to ticks: up to one tick later.
				lo, hi := cfg.Interval-cfg.Interval/10, cfg.Interval+cfg.Interval/10+tickOf(cfg.Interval)
				for i := 1; i < len(pings); i++ {
					if gap := pings[i].Sub(pings[i-1]); gap < lo || gap > hi {
						t.Errorf("gap before ping %d = %v, want in [%v, %v]", i, gap, lo, hi)
					}
				}
				for i, pl := range payloads {
					if want := fmt.Sprintf("%s%08x", PayloadPrefix, i+1); pl != want {
						t.Errorf("payload %d = %q, want %q", i, pl, want)
					}
					if !m.IsOwnPong([]byte(pl)) {
						t.Errorf("IsOwnPong(%q) = false for a payload sluice sent", pl)
					}
				}
				if len(stales) != 0 {
					t.Errorf("answering peer declared stale at %v", stales)
				}
				settle(m, cfg)
			})
		})
	}
}

func TestSilentPeerStale(t *testing.T) {
	cases := []struct {
		name      string
		answers   int           // pings answered before the peer falls silent
		pongDelay time.Duration // 0: the pong arrives during SendPing
	}{
		{name: "never answers", answers: 0},
		{name: "answers one", answers: 1},
		{name: "answers three", answers: 3},
		{name: "answers three late", answers: 3, pongDelay: 9 * time.Second},
		{name: "pong after timeout", answers: 1, pongDelay: 11 * time.Second},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				cfg := testCfg
				t0 := time.Now()
				p := &recPeer{pongDelay: tc.pongDelay}
				p.answer.Store(tc.answers > 0)
				if tc.answers > 0 {
					p.onPing = func(m *Monitor) {
						if m.PingsSent() >= uint64(tc.answers) {
							p.answer.Store(false)
						}
					}
				}
				m := start(cfg, p)
				time.Sleep(time.Duration(tc.answers+20) * cfg.Interval)
				synctest.Wait()
				pings, answered, stales, _ := p.snapshot()

				if len(stales) != 1 {
					t.Fatalf("Stale called %d times, want 1", len(stales))
				}
				lastLife := t0
				if len(answered) > 0 {
					lastLife = answered[len(answered)-1]
				}
				if tc.pongDelay > cfg.Timeout {
					// The pong came too late to count: stale one Timeout after the first ping.
					lastLife = t0
					if got := stales[0].Sub(pings[0]); got != cfg.Timeout {
						t.Errorf("stale %v after the first ping, want %v", got, cfg.Timeout)
					}
				}
				// With ±10% jitter on the ping period, and pings aligned to
				// ticks, the bound is 1.1·Interval + tick + Timeout.
				maxWait := cfg.Interval + cfg.Interval/10 + tickOf(cfg.Interval) + cfg.Timeout
				if got := stales[0].Sub(lastLife); got < cfg.Timeout || got > maxWait {
					t.Errorf("stale %v after last answered ping, want in [%v, %v]", got, cfg.Timeout, maxWait)
				}
				if got := stales[0].Sub(pings[len(pings)-1]); got != cfg.Timeout {
					t.Errorf("stale %v after the unanswered ping, want %v", got, cfg.Timeout)
				}
				if want := max(tc.answers, 0) + 1; tc.pongDelay <= cfg.Timeout && len(pings) != want {
					t.Errorf("%d pings, want %d (pinging must stop at Stale)", len(pings), want)
				}
				settle(m, cfg)
			})
		})
	}
}

func TestDataWithoutPongIsNotStale(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := testCfg
		p := &recPeer{} // never answers a ping
		m := start(cfg, p)
		// A long upload: a frame every 7 s, never a pong.
		const frames = 100
		done := make(chan struct{})
		go func() {
			defer close(done)
			for range frames {
				time.Sleep(7 * time.Second)
				m.Heard()
			}
		}()
		<-done
		pings, _, stales, _ := p.snapshot()
		if len(stales) != 0 {
			t.Fatalf("peer sending data declared stale after %d pings", len(pings))
		}
		if len(pings) < frames*7/30 {
			t.Errorf("only %d pings during %v of data", len(pings), frames*7*time.Second)
		}
		// Once the data stops, the peer goes stale like any silent one.
		time.Sleep(cfg.Interval + cfg.Interval/10 + cfg.Timeout)
		synctest.Wait()
		if _, _, stales, _ = p.snapshot(); len(stales) != 1 {
			t.Errorf("Stale called %d times after the data stopped, want 1", len(stales))
		}
		settle(m, cfg)
	})
}

// pongCases are shared by TestIsOwnPong and BenchmarkIsOwnPong.
var pongCases = []struct {
	name    string
	payload string
	own     bool
}{
	{"sluice first", PayloadPrefix + "00000001", true},
	{"sluice wrapped", PayloadPrefix + "ffffffff", true},
	{"sluice mid", PayloadPrefix + "0000002a", true},
	{"empty", "", false},
	{"hello", "hello", false},
	{"prefix of prefix", "sluice-k", false},
	{"prefix only", PayloadPrefix, false},
	{"short counter", PayloadPrefix + "0000002", false},
	{"long counter", PayloadPrefix + "0000002a0", false},
	{"not hex", PayloadPrefix + "0000002g", false},
	{"upper hex", PayloadPrefix + "0000002A", false},
	{"other case", "Sluice-ka:0000002a", false},
	{"backend ping", "ping-1733000000", false},
	{"max control payload", string(make([]byte, 125)), false},
}

func TestIsOwnPong(t *testing.T) {
	m := Start(testCfg, &recPeer{})
	defer m.Stop()
	off := Start(Config{}, &recPeer{})
	for _, tc := range pongCases {
		t.Run(tc.name, func(t *testing.T) {
			if got := m.IsOwnPong([]byte(tc.payload)); got != tc.own {
				t.Errorf("IsOwnPong(%q) = %v, want %v", tc.payload, got, tc.own)
			}
			if off.IsOwnPong([]byte(tc.payload)) {
				t.Errorf("disabled Monitor claims pong %q", tc.payload)
			}
		})
	}
	var buf [payloadLen]byte
	for _, n := range []uint32{0, 1, 0xdeadbeef, 0xffffffff} {
		fillPayload(&buf, n)
		if !m.IsOwnPong(buf[:]) {
			t.Errorf("IsOwnPong(%q) = false for fillPayload(%#x)", buf[:], n)
		}
	}
}

func TestNoAllocs(t *testing.T) {
	m := Start(testCfg, &recPeer{})
	defer m.Stop()
	pong := []byte(PayloadPrefix + "0000002a")
	if n := testing.AllocsPerRun(1000, m.Heard); n != 0 {
		t.Errorf("Heard: %v allocs, want 0", n)
	}
	if n := testing.AllocsPerRun(1000, func() { m.IsOwnPong(pong) }); n != 0 {
		t.Errorf("IsOwnPong: %v allocs, want 0", n)
	}
}

func TestStopPreventsCallbacks(t *testing.T) {
	cases := []struct {
		name   string
		answer bool
		stopAt func(cfg Config, firstPing time.Duration) time.Duration // from t0
	}{
		{"before first ping", true, func(Config, time.Duration) time.Duration { return 0 }},
		{"between pings", true, func(cfg Config, _ time.Duration) time.Duration { return 3 * cfg.Interval }},
		// Silent peer stopped while its pong is awaited: no Stale must follow.
		{"while awaiting pong", false, func(cfg Config, first time.Duration) time.Duration { return first + cfg.Timeout/2 }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				cfg := testCfg
				t0 := time.Now()
				// The first ping is jittered, so a silent peer waits for it
				// before choosing the moment to stop.
				pinged := make(chan struct{}, 1)
				p := &recPeer{onPing: func(*Monitor) {
					select {
					case pinged <- struct{}{}:
					default:
					}
				}}
				p.answer.Store(tc.answer)
				m := start(cfg, p)
				var first time.Duration
				if !tc.answer {
					<-pinged
					first = time.Since(t0)
				}
				if d := tc.stopAt(cfg, first) - time.Since(t0); d > 0 {
					time.Sleep(d)
				}
				m.Stop()
				m.Stop() // idempotent
				sent := m.PingsSent()
				pings, _, stales, _ := p.snapshot()
				time.Sleep(10 * cfg.Interval)
				synctest.Wait()
				pings2, _, stales2, _ := p.snapshot()
				if len(pings2) != len(pings) || m.PingsSent() != sent {
					t.Errorf("pings after Stop: %d -> %d", len(pings), len(pings2))
				}
				if len(stales2) != len(stales) || len(stales2) != 0 {
					t.Errorf("Stale called %d times around Stop, want 0", len(stales2))
				}
				settle(m, cfg)
			})
		})
	}
}

func TestDisabled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := &recPeer{}
		m := start(Config{Interval: 0, Timeout: 10 * time.Second}, p)
		m.Heard()
		if m.IsOwnPong([]byte(PayloadPrefix + "00000001")) {
			t.Error("disabled Monitor claims a pong")
		}
		time.Sleep(1000 * time.Hour)
		synctest.Wait()
		pings, _, stales, _ := p.snapshot()
		if len(pings) != 0 || len(stales) != 0 || m.PingsSent() != 0 {
			t.Errorf("disabled Monitor called back: %d pings, %d stales", len(pings), len(stales))
		}
		m.Stop()
		m.Stop()
	})
}

func TestStopFromCallbacks(t *testing.T) {
	t.Run("Stale", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := &recPeer{onStale: func(m *Monitor) { m.Stop(); m.Stop() }}
			m := start(testCfg, p)
			time.Sleep(10 * testCfg.Interval)
			synctest.Wait()
			pings, _, stales, _ := p.snapshot()
			if len(pings) != 1 || len(stales) != 1 {
				t.Errorf("%d pings, %d stales, want 1 and 1", len(pings), len(stales))
			}
			m.Stop()
		})
	})
	t.Run("SendPing", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := &recPeer{onPing: func(m *Monitor) { m.Stop() }}
			m := start(testCfg, p)
			time.Sleep(10 * testCfg.Interval)
			synctest.Wait()
			pings, _, stales, _ := p.snapshot()
			if len(pings) != 1 || len(stales) != 0 || m.PingsSent() != 1 {
				t.Errorf("%d pings, %d stales, want 1 and 0", len(pings), len(stales))
			}
		})
	})
}

func TestInvalidConfigPanics(t *testing.T) {
	for _, cfg := range []Config{
		{Interval: -time.Second, Timeout: time.Second},
		{Interval: 25 * time.Second, Timeout: 0},
		{Interval: 25 * time.Second, Timeout: -time.Second},
		{Interval: 25 * time.Second, Timeout: 25 * time.Second},
		{Interval: 25 * time.Second, Timeout: 30 * time.Second},
	} {
		t.Run(fmt.Sprintf("%+v", cfg), func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Errorf("Start(%+v) did not panic", cfg)
				}
			}()
			Start(cfg, &recPeer{}).Stop()
		})
	}
}

// TestTimeoutNearInterval checks that a Timeout close to Interval still leaves
// a gap between the end of one pong wait and the next ping.
func TestTimeoutNearInterval(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := Config{Interval: 10 * time.Second, Timeout: 9900 * time.Millisecond}
		p := &recPeer{}
		p.answer.Store(true)
		m := start(cfg, p)
		time.Sleep(50 * cfg.Interval)
		synctest.Wait()
		pings, _, stales, _ := p.snapshot()
		for i := 1; i < len(pings); i++ {
			hi := cfg.Interval + cfg.Interval/10 + tickOf(cfg.Interval)
			if gap := pings[i].Sub(pings[i-1]); gap <= cfg.Timeout || gap > hi {
				t.Errorf("gap before ping %d = %v, want in (%v, %v]", i, gap, cfg.Timeout, hi)
			}
		}
		if len(stales) != 0 {
			t.Errorf("answering peer declared stale")
		}
		settle(m, cfg)
	})
}

// countPeer answers every ping at once and counts callbacks; it must not
// allocate, so it can stand for a cheap writer enqueue.
type countPeer struct {
	m      atomic.Pointer[Monitor]
	stale  atomic.Bool
	stopIn bool // Stop from inside SendPing
	pings  *atomic.Int64
	stales *atomic.Int64
}

func (p *countPeer) SendPing([]byte) {
	p.pings.Add(1)
	if m := p.m.Load(); m != nil {
		m.Heard()
		if p.stopIn {
			m.Stop()
		}
	}
}

func (p *countPeer) Stale() {
	p.stale.Store(true)
	p.stales.Add(1)
}

// TestStopRace starts and stops monitors with very short real-time
// intervals, stopping some from other goroutines and some from inside
// callbacks, for the race detector's sake.
func TestStopRace(t *testing.T) {
	const n = 200
	var pings, stales atomic.Int64
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			p := &countPeer{pings: &pings, stales: &stales, stopIn: i%8 == 0}
			cfg := Config{Interval: 200 * time.Microsecond, Timeout: 100 * time.Microsecond}
			m := Start(cfg, p)
			if i%2 == 0 {
				p.m.Store(m) // odd peers stay silent and go stale
			}
			for m.PingsSent() < uint64(1+i%3) && !p.stale.Load() && !(p.stopIn && m.PingsSent() > 0) {
				runtime.Gosched()
			}
			m.Stop()
		})
	}
	wg.Wait()
	if pings.Load() < n {
		t.Errorf("%d pings from %d monitors", pings.Load(), n)
	}
}

func BenchmarkHeard(b *testing.B) {
	m := Start(testCfg, &recPeer{})
	defer m.Stop()
	b.ReportAllocs()
	for b.Loop() {
		m.Heard()
	}
}

func BenchmarkIsOwnPong(b *testing.B) {
	m := Start(testCfg, &recPeer{})
	defer m.Stop()
	for _, tc := range pongCases {
		payload := []byte(tc.payload)
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				m.IsOwnPong(payload)
			}
		})
	}
}

// BenchmarkIdleMonitors keeps 50,000 monitors alive whose peers answer at
// once, and reports the process CPU time used per wall second, the ping rate
// and the heap cost of one Monitor with its timer.
func BenchmarkIdleMonitors(b *testing.B) {
	if testing.Short() {
		b.Skip("3 s real-time window per case")
	}
	for _, tc := range []struct {
		n   int
		cfg Config
	}{
		{0, Config{Interval: time.Second, Timeout: 500 * time.Millisecond}}, // baseline: the process alone
		{50_000, Config{Interval: time.Second, Timeout: 500 * time.Millisecond}},
		{50_000, Config{Interval: 25 * time.Second, Timeout: 10 * time.Second}},
	} {
		b.Run(fmt.Sprintf("monitors=%d/interval=%v", tc.n, tc.cfg.Interval), func(b *testing.B) {
			benchIdle(b, tc.n, tc.cfg)
		})
	}
}

func benchIdle(b *testing.B, n int, cfg Config) {
	const window = 3 * time.Second
	var pings, stales atomic.Int64
	peers := make([]countPeer, n)
	monitors := make([]*Monitor, n)
	for i := range peers {
		peers[i] = countPeer{pings: &pings, stales: &stales}
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range monitors {
		monitors[i] = Start(cfg, &peers[i])
		peers[i].m.Store(monitors[i])
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.GC() // leave no GC work from set-up inside the window
	heapPer := float64(after.HeapAlloc-before.HeapAlloc) / float64(max(n, 1))

	// Let the first pings spread out before measuring, when that is quick.
	if cfg.Interval <= window {
		time.Sleep(cfg.Interval)
	}
	for b.Loop() {
		// The window is fixed: one iteration is enough and b.N stays 1.
		p0 := pings.Load()
		c0 := cpuTime(b)
		time.Sleep(window)
		cpu := cpuTime(b) - c0
		b.ReportMetric(float64(cpu.Microseconds())/1000/window.Seconds(), "cpu-ms/s")
		b.ReportMetric(float64(pings.Load()-p0)/window.Seconds(), "pings/s")
	}
	for _, m := range monitors {
		m.Stop()
	}
	b.ReportMetric(heapPer, "heap-B/monitor")
	b.ReportMetric(float64(stales.Load()), "stales")
	b.ReportMetric(0, "ns/op")
	runtime.KeepAlive(peers)
}

// cpuTime is the user plus system CPU time used by the process so far.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatalf("getrusage: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// TestPingsShareTicks checks that many connections' pings are batched:
// 2,000 monitors ping at no more distinct instants than there are ticks
// in an interval (random times would give ~2,000), so the process wakes
// once per batch, not once per connection.
func TestPingsShareTicks(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const n = 2000
		cfg := testCfg
		peers, monitors := startAnswering(n, cfg)
		time.Sleep(3 * cfg.Interval)
		synctest.Wait()
		instants := map[time.Time]bool{}
		pings := 0
		for _, p := range peers {
			ps, _, _, _ := p.snapshot()
			for _, at := range ps {
				instants[at] = true
			}
			pings += len(ps)
		}
		if pings < 2*n {
			t.Fatalf("%d pings from %d monitors in 3 intervals", pings, n)
		}
		// Three intervals hold at most 3·256+1 ticks.
		if max := 3*int(cfg.Interval/tickOf(cfg.Interval)) + 1; len(instants) > max {
			t.Errorf("%d pings at %d distinct instants, want at most %d (one per tick)", pings, len(instants), max)
		}
		for _, m := range monitors {
			m.Stop()
		}
	})
}

// heldPeer is a recPeer whose reads sluice can hold back (Holder).
type heldPeer struct {
	recPeer
	held atomic.Bool
}

func (p *heldPeer) Held() bool { return p.held.Load() }

// While sluice is not reading the peer (held), the pong deadline does not
// run out: the pong waits in the peer's send buffer behind its data. Once
// the hold ends, the peer has a whole Timeout more; after that, silence is
// the peer's own and it is stale.
func TestHeldPeerNotStale(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := testCfg
		p := &heldPeer{}
		var holdEnded time.Time
		p.onPing = func(m *Monitor) {
			if m.PingsSent() == 1 {
				p.held.Store(true) // sluice stops reading just as it pings
			}
		}
		m := Start(cfg, p)
		p.m.Store(m)
		// Held for five timeouts: never stale.
		time.Sleep(cfg.Interval + 5*cfg.Timeout)
		synctest.Wait()
		if _, _, stales, _ := p.snapshot(); len(stales) != 0 {
			t.Fatalf("stale while held, %v after the ping", stales[0].Sub(p.pings[0]))
		}
		p.held.Store(false)
		holdEnded = time.Now()
		time.Sleep(3 * cfg.Timeout)
		synctest.Wait()
		_, _, stales, _ := p.snapshot()
		if len(stales) != 1 {
			t.Fatalf("Stale called %d times after the hold ended, want 1", len(stales))
		}
		if got := stales[0].Sub(holdEnded); got < cfg.Timeout || got > 2*cfg.Timeout {
			t.Errorf("stale %v after the hold ended, want a whole Timeout more, at most two (%v..%v)", got, cfg.Timeout, 2*cfg.Timeout)
		}
		settle(m, cfg)
	})
}

// A held peer that answers once the hold ends is not stale, and the
// schedule goes on as usual.
func TestHeldPeerAnswersAfterHold(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := testCfg
		p := &heldPeer{}
		p.onPing = func(m *Monitor) {
			if m.PingsSent() == 1 {
				p.held.Store(true)
				go func() {
					time.Sleep(4 * cfg.Timeout)
					p.held.Store(false)
					time.Sleep(cfg.Timeout / 2)
					m.Heard() // the backlog read; the pong behind it
					p.answer.Store(true)
				}()
			}
		}
		m := Start(cfg, p)
		p.m.Store(m)
		time.Sleep(10 * cfg.Interval)
		synctest.Wait()
		pings, _, stales, _ := p.snapshot()
		if len(stales) != 0 {
			t.Fatalf("stale %v after the first ping", stales[0].Sub(pings[0]))
		}
		if len(pings) < 5 {
			t.Errorf("%d pings in 10 intervals, want the schedule to go on", len(pings))
		}
		settle(m, cfg)
	})
}
