package limiter

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

const kb = 1 << 10

// evictions records what a Budget's guard asked of each queue.
type evictions struct {
	mu  sync.Mutex
	got map[string][]Reason // guarded by mu
}

// hook returns the onEvict callback of the queue called name.
func (e *evictions) hook(name string) func(Reason) {
	return func(r Reason) {
		e.mu.Lock()
		defer e.mu.Unlock()
		if e.got == nil {
			e.got = make(map[string][]Reason)
		}
		e.got[name] = append(e.got[name], r)
	}
}

// snapshot returns "name:reason" for every eviction, sorted.
func (e *evictions) snapshot() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []string
	for _, name := range slices.Sorted(maps.Keys(e.got)) {
		for _, r := range e.got[name] {
			out = append(out, name+":"+r.String())
		}
	}
	return out
}

// fillBytes pushes single-frame messages that add up to n bytes.
func fillBytes(t *testing.T, q *Queue, n int) {
	t.Helper()
	for n > 0 {
		size := min(n, 64*kb)
		n -= size
		mustPush(t, q, msg(uint64(n), max(size, 8)))
	}
}

// fillMessages pushes n small single-frame messages.
func fillMessages(t *testing.T, q *Queue, n int) {
	t.Helper()
	for i := range n {
		mustPush(t, q, msg(uint64(i), 16))
	}
}

// testSlowAge is the SlowAge of clientCfg's queues.
const testSlowAge = time.Second

func clientCfg() *Config {
	return &Config{Policy: Evict, MaxMessages: 1000, MaxBytes: 1 << 30, LowWater: 0.5, SlowAge: testSlowAge}
}

// guardClock runs a Budget's samples on a clock of its own, one
// GuardInterval a tick, so that tests of slowness neither sleep nor race
// the real guard. Messages are queued at its time too, so they are as
// old as the ticks say.
type guardClock struct {
	b *Budget
	t atomic.Int64 // read by producers that wait in Push
}

func newGuardClock(b *Budget) *guardClock {
	c := &guardClock{b: b}
	c.t.Store(int64(time.Hour))
	b.clock = c.t.Load
	return c
}

// run takes the samples of d, one a GuardInterval; during calls each
// tick's work first.
func (c *guardClock) run(d time.Duration, during ...func()) {
	for n := int(d / GuardInterval); n > 0; n-- {
		for _, f := range during {
			f()
		}
		c.b.sampleAt(c.t.Add(int64(GuardInterval)), nil)
	}
}

func TestBudgetAccounting(t *testing.T) {
	b := NewBudget(BudgetConfig{Ceiling: 1 << 30, SlowRatio: 0.5})
	client := NewQueue(clientCfg(), b, nil)
	dropper := NewQueue(&Config{Policy: Drop, MaxMessages: 4, MaxBytes: 1 << 20, LowWater: 0.5, KeepNewest: 2, SlowAge: testSlowAge}, b, nil)
	upstream := NewQueue(&Config{Policy: Pause, MaxMessages: 100, MaxBytes: 1 << 20, LowWater: 0.5}, b, nil)
	queues := []*Queue{client, dropper, upstream}
	check := func(step string) {
		t.Helper()
		var sum int64
		for _, q := range queues {
			sum += q.Bytes()
		}
		if got := b.Stats().QueuedBytes; got != sum {
			t.Fatalf("%s: QueuedBytes = %d, queues hold %d", step, got, sum)
		}
	}

	if st := b.Stats(); st.Connections != 2 {
		t.Fatalf("Connections = %d, want 2: only queues with a SlowAge count", st.Connections)
	}
	for i := range 10 {
		for _, q := range queues {
			mustPush(t, q, msg(uint64(i), 100+i))
		}
		check(fmt.Sprintf("push %d", i))
	}
	if dropper.Dropped() == 0 {
		t.Fatal("the drop queue dropped nothing")
	}
	mustPush(t, client, dataSeg(100, 300, true, false)) // a message in parts
	mustPush(t, client, dataSeg(101, 300, false, true))
	mustPush(t, client, follow(102, 1<<20, true, true)) // only its header is queued
	check("streamed")
	for _, q := range queues {
		take(t, q, 3, 1<<20)
		check("take")
	}
	client.PushControl(ctlSeg(1)) // control frames are not counted
	check("control")
	client.PushClose(closeSeg(), true)
	check("priority close")
	dropper.PushClose(closeSeg(), false)
	take(t, dropper, 2, 1<<20)
	check("take before an after-data close")
	for _, q := range queues {
		q.Close()
		check("close")
	}
	if st := b.Stats(); st.QueuedBytes != 0 || st.Connections != 0 || st.Slow != 0 {
		t.Fatalf("after closing every queue: %+v", st)
	}
	if st := b.Stats(); st.DroppedTotal != dropper.Dropped() {
		t.Fatalf("DroppedTotal = %d, the queue dropped %d", st.DroppedTotal, dropper.Dropped())
	}
}

// Slow means stalled: a queue is slow when its client has taken nothing for
// SlowAge while data waited; not when it is deep while bytes flow.
func TestSlowMeansStalled(t *testing.T) {
	slow := func(t *testing.T, b *Budget, want int, step string) {
		t.Helper()
		if got := b.Stats().Slow; got != want {
			t.Fatalf("%s: Slow = %d, want %d", step, got, want)
		}
	}
	t.Run("deep but taking is not slow", func(t *testing.T) {
		b := NewBudget(BudgetConfig{SlowRatio: 0.5})
		q := NewQueue(clientCfg(), b, nil)
		defer q.Close()
		clock := newGuardClock(b)
		fillMessages(t, q, 300)
		// 100 arrive and 100 are taken a tick: 300 deep for three times
		// SlowAge, each message a few ticks old when taken.
		clock.run(3*testSlowAge, func() { fillMessages(t, q, 100); take(t, q, 100, 1<<30) })
		if q.Messages() != 300 {
			t.Fatalf("depth %d, want 300", q.Messages())
		}
		slow(t, b, 0, "taking 100 messages a tick, 300 deep")
		if q.IsSlow() || q.StalledFor() != 0 {
			t.Fatalf("IsSlow %v StalledFor %v, want false 0", q.IsSlow(), q.StalledFor())
		}
	})
	t.Run("nothing taken for SlowAge", func(t *testing.T) {
		b := NewBudget(BudgetConfig{SlowRatio: 0.5})
		q := NewQueue(clientCfg(), b, nil)
		defer q.Close()
		clock := newGuardClock(b)
		mustPush(t, q, msg(1, 16))
		take(t, q, 1, 1<<20) // the writer took it; the socket took no more
		clock.run(GuardInterval)
		fillMessages(t, q, 3)
		// Timed from the first sample that sees the messages waiting.
		clock.run(testSlowAge)
		slow(t, b, 0, "stalled just under SlowAge")
		clock.run(GuardInterval)
		slow(t, b, 1, "stalled for SlowAge")
		if got := q.StalledFor(); got != testSlowAge {
			t.Fatalf("StalledFor = %v, want %v", got, testSlowAge)
		}
		take(t, q, 1, 1<<20)
		if q.StalledFor() != 0 {
			t.Fatal("StalledFor after a Take: want 0 until the next sample")
		}
		clock.run(GuardInterval)
		slow(t, b, 0, "a batch taken")
		clock.run(testSlowAge + GuardInterval)
		slow(t, b, 1, "stalled again")
		take(t, q, 10, 1<<20) // drained
		clock.run(GuardInterval)
		slow(t, b, 0, "drained")
		clock.run(2 * testSlowAge)
		slow(t, b, 0, "nothing waiting: never slow")
	})
	t.Run("unsent bytes moving is progress", func(t *testing.T) {
		b := NewBudget(BudgetConfig{SlowRatio: 0.5})
		q := NewQueue(clientCfg(), b, nil)
		defer q.Close()
		var kernel int64 = 200 * kb
		q.OnUnsent(func() int64 { return kernel })
		clock := newGuardClock(b)
		mustPush(t, q, msg(1, 16))
		take(t, q, 1, 1<<20) // the writer now blocks on a full socket
		// The client reads: what the kernel holds moves, though the
		// writer takes nothing more.
		clock.run(3*testSlowAge, func() { kernel -= 16; fillMessages(t, q, 1) })
		slow(t, b, 0, "kernel bytes moving")
		clock.run(testSlowAge + GuardInterval) // kernel bytes still to the byte
		slow(t, b, 1, "kernel bytes still: the client stopped reading")
	})
	t.Run("a kernel buffer filling is no progress", func(t *testing.T) {
		b := NewBudget(BudgetConfig{SlowRatio: 0.5})
		q := NewQueue(clientCfg(), b, nil)
		defer q.Close()
		var kernel int64
		q.OnUnsent(func() int64 { return kernel })
		clock := newGuardClock(b)
		// The client stopped reading, but the kernel's send buffer still
		// has room: every message is taken and lands there, unacknowledged.
		// Taken alone, that looked like a client keeping up.
		clock.run(testSlowAge+2*GuardInterval, func() {
			fillMessages(t, q, 1)
			take(t, q, 1, 1<<20)
			kernel += 16
		})
		slow(t, b, 1, "every batch taken into a kernel buffer nobody reads")
		// The client reads: the kernel holds less than before.
		clock.run(GuardInterval, func() { kernel -= 64 })
		slow(t, b, 0, "the client acknowledged bytes")
	})
	t.Run("falling behind while taking is not slow", func(t *testing.T) {
		b := NewBudget(BudgetConfig{SlowRatio: 0.5})
		cfg := clientCfg()
		cfg.MaxMessages = 1 << 20
		q := NewQueue(cfg, b, nil)
		defer q.Close()
		clock := newGuardClock(b)
		// Twenty arrive and one is taken a tick: on a saturated pod a
		// client may be seconds behind and still read all it can. That is
		// for the write deadline, drop and PauseMax to bound, not for the
		// slow verdict.
		clock.run(5*testSlowAge, func() { fillMessages(t, q, 20); take(t, q, 1, 1) })
		slow(t, b, 0, "1,900 behind, taking")
	})
	t.Run("evicted and closed queues are not counted", func(t *testing.T) {
		b := NewBudget(BudgetConfig{SlowRatio: 0.5})
		q1, q2 := NewQueue(clientCfg(), b, nil), NewQueue(clientCfg(), b, nil)
		clock := newGuardClock(b)
		for _, q := range []*Queue{q1, q2} {
			mustPush(t, q, msg(1, 16))
			take(t, q, 1, 1<<20)
			fillMessages(t, q, 3)
		}
		clock.run(testSlowAge + GuardInterval)
		slow(t, b, 2, "both stalled")
		q1.MarkEvicted()
		slow(t, b, 1, "one evicted")
		q2.Close()
		slow(t, b, 0, "the other closed")
		q1.Close()
	})
}

func TestBudgetCheckCeiling(t *testing.T) {
	tests := []struct {
		name     string
		ceiling  int64
		sizes    []int    // KiB in each client queue, named q<KiB>
		upstream int      // KiB in an upstream queue the guard cannot evict
		marked   []string // queues evicted before the Check
		want     []string
	}{
		{"largest first", 120 * kb, []int{100, 50, 30, 10}, 0, nil, []string{"q100:global_ceiling"}},
		{"as many as needed", 50 * kb, []int{30, 100, 10, 50}, 0, nil, []string{"q100:global_ceiling", "q50:global_ceiling"}},
		{"all", 5 * kb, []int{100, 50, 30, 10}, 0, nil,
			[]string{"q10:global_ceiling", "q100:global_ceiling", "q30:global_ceiling", "q50:global_ceiling"}},
		{"under the ceiling", 190 * kb, []int{100, 50, 30, 10}, 0, nil, nil},
		{"evicted bytes leave", 120 * kb, []int{100, 50, 30, 10}, 0, []string{"q100"}, nil},
		{"evicted not picked twice", 60 * kb, []int{100, 50, 30, 10}, 0, []string{"q100"}, []string{"q50:global_ceiling"}},
		{"upstream bytes count", 120 * kb, []int{50, 30, 10}, 100, nil, []string{"q30:global_ceiling", "q50:global_ceiling"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := NewBudget(BudgetConfig{Ceiling: tt.ceiling})
			var ev evictions
			named := make(map[string]*Queue)
			for _, size := range tt.sizes {
				name := fmt.Sprintf("q%d", size)
				q := NewQueue(clientCfg(), b, ev.hook(name))
				defer q.Close()
				fillBytes(t, q, size*kb)
				named[name] = q
			}
			if tt.upstream > 0 {
				up := NewQueue(&Config{Policy: Pause, MaxMessages: 100, MaxBytes: 1 << 30, LowWater: 0.5}, b, nil)
				defer up.Close()
				fillBytes(t, up, tt.upstream*kb)
			}
			for _, name := range tt.marked {
				if !named[name].MarkEvicted() {
					t.Fatalf("MarkEvicted(%s) = false on a fresh queue", name)
				}
			}
			b.Check()
			if got := ev.snapshot(); !slices.Equal(got, tt.want) {
				t.Fatalf("evicted %v, want %v", got, tt.want)
			}
			// The queues have not shrunk yet; the next Check must not pick
			// more, nor the same ones again.
			b.Check()
			if got := ev.snapshot(); !slices.Equal(got, tt.want) {
				t.Fatalf("second Check: evicted %v, want %v", got, tt.want)
			}
			for _, name := range tt.marked {
				if named[name].MarkEvicted() {
					t.Fatalf("MarkEvicted(%s) = true twice", name)
				}
			}
		})
	}
}

// stalledQueues makes, in b, a queue per entry of stalls that has taken
// nothing for one tick more than that (named s<ticks>), and conns-len(stalls) that
// keep up (named fast<i>), on clock; all are sampled as of clock's end.
func stalledQueues(t *testing.T, b *Budget, clock *guardClock, ev *evictions, conns int, stalls []int, during ...func()) {
	t.Helper()
	longest := slices.Max(append([]int{0}, stalls...))
	var pending []func()
	for i := range conns {
		name, stall := fmt.Sprintf("fast%d", i), -1
		if i < len(stalls) {
			name, stall = fmt.Sprintf("s%d", stalls[i]), stalls[i]
		}
		q := NewQueue(clientCfg(), b, ev.hook(name))
		t.Cleanup(q.Close)
		mustPush(t, q, msg(0, 16))
		take(t, q, 1, 1<<20)
		if stall < 0 {
			pending = append(pending, func() { fillMessages(t, q, 1); take(t, q, 1, 1<<20) })
			continue
		}
		// Data waits from the tick that leaves stall ticks to the end,
		// after at least one tick of taking.
		start := longest - stall + 1
		ticks := 0
		pending = append(pending, func() {
			if ticks == start {
				fillMessages(t, q, 1)
			} else if ticks < start {
				fillMessages(t, q, 1)
				take(t, q, 1, 1<<20)
			}
			ticks++
		})
	}
	clock.run(time.Duration(longest+2)*GuardInterval, append(pending, during...)...)
}

func TestBudgetCheckSlowRatio(t *testing.T) {
	// SlowAge is 20 ticks.
	tests := []struct {
		name   string
		ratio  float64
		conns  int
		stalls []int // ticks each stalled queue has taken nothing
		want   []string
	}{
		{"floor of four allowed", 0.05, 20, []int{30, 25, 40, 22}, nil},
		{"five stalled of 20", 0.05, 20, []int{30, 25, 40, 22, 35}, []string{"s40:slow_ratio"}},
		{"longest stalled first", 0.05, 20, []int{30, 25, 40, 22, 35, 50, 21}, []string{"s35:slow_ratio", "s40:slow_ratio", "s50:slow_ratio"}},
		{"not yet SlowAge", 0.05, 20, []int{30, 25, 40, 22, 18, 10}, nil},
		{"ratio allows six", 0.1, 60, []int{30, 25, 40, 22, 35, 50, 21}, []string{"s50:slow_ratio"}},
		{"within the ratio", 0.5, 20, []int{30, 25, 40, 22, 35, 50, 21}, nil},
		{"ratio off", 0, 20, []int{30, 25, 40, 22, 35, 50, 21}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := NewBudget(BudgetConfig{SlowRatio: tt.ratio})
			var ev evictions
			stalledQueues(t, b, newGuardClock(b), &ev, tt.conns, tt.stalls)
			slow := 0
			for _, s := range tt.stalls {
				if time.Duration(s+1)*GuardInterval >= testSlowAge {
					slow++
				}
			}
			st := b.Stats()
			if st.Slow != slow || st.Connections != tt.conns {
				t.Fatalf("Stats: Slow %d Connections %d, want %d %d", st.Slow, st.Connections, slow, tt.conns)
			}
			b.Check()
			if got := ev.snapshot(); !slices.Equal(got, tt.want) {
				t.Fatalf("evicted %v, want %v", got, tt.want)
			}
			b.Check() // the evicted ones are not picked again
			if got := ev.snapshot(); !slices.Equal(got, tt.want) {
				t.Fatalf("second Check: evicted %v, want %v", got, tt.want)
			}
		})
	}
}

// A queue that is deep but keeps taking is never picked by the ratio
// guard, even when it is the deepest and the guard must act.
func TestBudgetCheckSlowSparesTheBusy(t *testing.T) {
	b := NewBudget(BudgetConfig{SlowRatio: 0.05})
	var ev evictions
	clock := newGuardClock(b)
	deep := NewQueue(clientCfg(), b, ev.hook("deep"))
	defer deep.Close()
	fillMessages(t, deep, 300)
	busy := func() { fillMessages(t, deep, 100); take(t, deep, 100, 1<<30) }
	stalledQueues(t, b, clock, &ev, 5, []int{25, 26, 27, 28, 29}, busy)
	if deep.IsSlow() || deep.Messages() != 300 {
		t.Fatalf("the busy queue: IsSlow %v, %d deep; want false, 300", deep.IsSlow(), deep.Messages())
	}
	b.Check()
	if got, want := ev.snapshot(), []string{"s29:slow_ratio"}; !slices.Equal(got, want) {
		t.Fatalf("evicted %v, want %v", got, want)
	}
}

func TestBudgetAllowedSlow(t *testing.T) {
	for _, tt := range []struct {
		ratio float64
		conns int
		want  int
	}{
		{0.05, 0, 4}, {0.05, 19, 4}, {0.05, 80, 4}, {0.05, 100, 5}, {0.1, 20, 4}, {0.5, 7, 4}, {0.5, 12, 6}, {1, 5, 5},
		{0.005, 200, 4}, {0.005, 10000, 50},
	} {
		b := NewBudget(BudgetConfig{SlowRatio: tt.ratio})
		for range tt.conns {
			q := NewQueue(clientCfg(), b, nil)
			defer q.Close()
		}
		if st := b.Stats(); st.AllowedSlow != tt.want || st.SlowThreshold != tt.ratio {
			t.Errorf("ratio %v with %d connections: AllowedSlow %d, want %d", tt.ratio, tt.conns, st.AllowedSlow, tt.want)
		}
	}
}

// A queue that breaks both bounds is evicted once, for the ceiling, and
// counts toward the slow excess too.
func TestBudgetCheckBoth(t *testing.T) {
	b := NewBudget(BudgetConfig{Ceiling: 100 * kb, SlowRatio: 0.05})
	var ev evictions
	clock := newGuardClock(b)
	big := NewQueue(clientCfg(), b, ev.hook("big"))
	defer big.Close()
	mustPush(t, big, msg(0, 16))
	take(t, big, 1, 1<<20)
	fillBytes(t, big, 6*64*kb) // over the ceiling, and stalled longest
	// 20 connections allow four slow; six are (big and five more). big
	// goes for the ceiling and is one of the two too many; s40, the
	// longest stalled of the rest, is the other.
	stalledQueues(t, b, clock, &ev, 19, []int{21, 25, 30, 35, 40})
	b.Check()
	want := []string{"big:global_ceiling", "s40:slow_ratio"}
	if got := ev.snapshot(); !slices.Equal(got, want) {
		t.Fatalf("evicted %v, want %v", got, want)
	}
}

func TestBudgetEach(t *testing.T) {
	b := NewBudget(BudgetConfig{})
	var made []*Queue
	for range 3 {
		q := NewQueue(clientCfg(), b, nil)
		defer q.Close()
		made = append(made, q)
	}
	up := NewQueue(&Config{Policy: Pause, MaxMessages: 8, MaxBytes: 1 << 20, LowWater: 0.5}, b, nil) // not counted
	defer up.Close()
	var seen []*Queue
	b.Each(func(q *Queue) { seen = append(seen, q) })
	if len(seen) != 3 {
		t.Fatalf("Each visited %d queues, want 3", len(seen))
	}
	for _, q := range made {
		if !slices.Contains(seen, q) {
			t.Fatal("Each missed a queue")
		}
	}
	made[0].Close()
	seen = seen[:0]
	b.Each(func(q *Queue) { seen = append(seen, q) })
	if len(seen) != 2 || slices.Contains(seen, made[0]) {
		t.Fatal("Each visits a closed queue")
	}
}

func TestGuard(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := NewBudget(BudgetConfig{Ceiling: 10 * kb})
		evicted := make(chan Reason, 1)
		q := NewQueue(clientCfg(), b, func(r Reason) { evicted <- r })
		defer q.Close()
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() {
			defer close(done)
			b.Guard(ctx)
		}()
		time.Sleep(GuardInterval) // a tick with nothing to do
		synctest.Wait()
		fillBytes(t, q, 20*kb)
		time.Sleep(GuardInterval - time.Nanosecond)
		synctest.Wait()
		if len(evicted) != 0 {
			t.Fatal("the guard acted between ticks")
		}
		time.Sleep(time.Nanosecond)
		synctest.Wait()
		select {
		case r := <-evicted:
			if r != ReasonGlobalCeiling {
				t.Fatalf("reason %v, want global_ceiling", r)
			}
		default:
			t.Fatal("the guard did not act on its tick")
		}
		cancel()
		<-done
	})
}

func TestReasonString(t *testing.T) {
	for r, want := range map[Reason]string{ReasonGlobalCeiling: "global_ceiling", ReasonSlowRatio: "slow_ratio", ReasonUpstreamCeiling: "upstream_ceiling", 0: "unknown"} {
		if got := r.String(); got != want {
			t.Errorf("Reason(%d).String() = %q, want %q", r, got, want)
		}
	}
}

// Sessions push, take and close while the guard evicts: the counters must
// come back to zero and the race detector stay quiet.
func TestBudgetConcurrent(t *testing.T) {
	b := NewBudget(BudgetConfig{Ceiling: 64 * kb, SlowRatio: 0.1})
	ctx, cancel := context.WithCancel(t.Context())
	guardDone := make(chan struct{})
	go func() {
		defer close(guardDone)
		for ctx.Err() == nil {
			b.Check()
			b.Stats()
		}
	}()
	var wg sync.WaitGroup
	var writers []*burstWriter
	for i := range 8 {
		evict := make(chan Reason, 1)
		q := NewQueue(&Config{Policy: Evict, MaxMessages: 64, MaxBytes: 32 * kb, LowWater: 0.5, SlowAge: testSlowAge},
			b, func(r Reason) { evict <- r })
		// Writers, started on demand: slow for odd i.
		w := newBurstWriter(t, q, 8, 4*kb, func(segs []*Segment) {
			if segs[len(segs)-1].Close {
				q.Close()
			} else if i%2 == 1 {
				runtime.Gosched() // a slower writer
			}
		})
		writers = append(writers, w)
		wg.Go(func() { // producer
			for id := uint64(0); id < 5000; id++ {
				select {
				case <-evict:
					q.MarkEvicted()
					w.PushClose(closeSeg(), true)
					return
				default:
				}
				s := msg(id, 64+int(id%1000))
				if err := w.Push(s); err != nil {
					s.Free()
					w.PushClose(closeSeg(), true)
					return
				}
			}
			w.PushClose(closeSeg(), false)
		})
	}
	wg.Wait()
	for _, w := range writers {
		<-w.done // the producer's close frame was taken
		w.wait()
	}
	cancel()
	<-guardDone
	if st := b.Stats(); st.QueuedBytes != 0 || st.Slow != 0 || st.Connections != 0 || st.Paused != 0 {
		t.Fatalf("after every queue closed: %+v", st)
	}
}

// BenchmarkCheck is the guard's tick when every bound holds: it must not
// look at the queues.
func BenchmarkCheck(b *testing.B) {
	bud := NewBudget(BudgetConfig{Ceiling: 1 << 30, SlowRatio: 0.05})
	for i := range 1000 {
		q := NewQueue(clientCfg(), bud, nil)
		defer q.Close()
		if i == 0 {
			for range 5 {
				s := msg(1, 512)
				if err := q.Push(s); err != nil {
					b.Fatal(err)
				}
			}
		}
	}
	b.ReportAllocs()
	for b.Loop() {
		bud.Check()
	}
}

// What the kernel holds unsent counts as the queue's bytes and toward the
// ceiling, but not toward the slow count (messages); it is sampled only
// for queues that wrote or still held bytes, and leaves the counts with
// the queue.
func TestUnsentCounts(t *testing.T) {
	b := NewBudget(BudgetConfig{Ceiling: 1 << 20, SlowRatio: 1})
	cfg := bigCfg(Evict)
	cfg.MaxMessages, cfg.MaxBytes, cfg.SlowAge = 100, 1<<20, testSlowAge
	var evicted []Reason
	q := NewQueue(cfg, b, func(r Reason) { evicted = append(evicted, r) })
	var kernel int64
	var samples int
	q.OnUnsent(func() int64 { samples++; return kernel })

	b.SampleUnsent(nil)
	if samples != 0 {
		t.Fatalf("an idle queue was sampled %d times", samples)
	}
	mustPush(t, q, msg(1, 100))
	take(t, q, 64, 1<<20)
	kernel = 60 << 10
	b.SampleUnsent(nil)
	if samples != 1 || q.Bytes() != kernel || q.Unsent() != kernel {
		t.Fatalf("after a write: samples %d Bytes %d Unsent %d, want 1 %d %d", samples, q.Bytes(), q.Unsent(), kernel, kernel)
	}
	if st := b.Stats(); st.QueuedBytes != kernel || st.UnsentBytes != kernel || st.Slow != 0 {
		t.Fatalf("budget after a write: %+v", st)
	}
	// Nothing written since, but bytes still unsent: sampled again.
	kernel = 2 << 20
	b.SampleUnsent(nil)
	if samples != 2 || q.Bytes() != kernel {
		t.Fatalf("stalled: samples %d Bytes %d", samples, q.Bytes())
	}
	b.Check()
	if len(evicted) != 1 || evicted[0] != ReasonGlobalCeiling {
		t.Fatalf("over the ceiling on unsent bytes alone: evicted %v", evicted)
	}
	s := msg(2, 100)
	if err := q.Push(s); !errors.Is(err, ErrOverflow) {
		t.Fatalf("Push past MaxBytes counting unsent bytes = %v, want ErrOverflow", err)
	}
	s.Free()
	kernel = 0
	b.SampleUnsent(nil)
	b.SampleUnsent(nil)
	if samples != 3 || q.Bytes() != 0 || b.Stats().Slow != 0 {
		t.Fatalf("drained: samples %d Bytes %d Slow %d, want 3 0 0", samples, q.Bytes(), b.Stats().Slow)
	}
	kernel = 4096
	mustPush(t, q, msg(3, 100))
	take(t, q, 64, 1<<20)
	b.SampleUnsent(nil)
	q.Close()
	if st := b.Stats(); st.QueuedBytes != 0 || st.UnsentBytes != 0 {
		t.Fatalf("after Close: %+v", st)
	}
}

// Over the ceiling, what evicted connections still hold in the kernel is
// taken back first, largest first, once each; live queues go only if
// that is not enough.
func TestBudgetReclaimsEvictedFirst(t *testing.T) {
	b := NewBudget(BudgetConfig{Ceiling: 100 * kb})
	var ev evictions
	mk := func(name string, heap int, unsent int64) *Queue {
		q := NewQueue(clientCfg(), b, ev.hook(name))
		t.Cleanup(q.Close)
		q.OnUnsent(func() int64 { return unsent })
		mustPush(t, q, msg(1, 16))
		take(t, q, 1, 1<<20) // a write, so that it is sampled
		if heap > 0 {
			fillBytes(t, q, heap)
		}
		return q
	}
	gone60 := mk("gone60", 0, 60*kb)
	gone30 := mk("gone30", 0, 30*kb)
	mk("live40", 40*kb, 0)
	b.SampleUnsent(nil)
	gone60.MarkEvicted()
	gone30.MarkEvicted()
	// 130 KiB over a 100 KiB ceiling: taking back gone60 is enough.
	b.Check()
	b.Check()
	if got, want := ev.snapshot(), []string{"gone60:reclaim"}; !slices.Equal(got, want) {
		t.Fatalf("evicted %v, want %v", got, want)
	}
	// Far over: everything evicted is taken back, then the live queue goes.
	b2 := NewBudget(BudgetConfig{Ceiling: 10 * kb})
	b = b2
	ev = evictions{}
	a, c := mk("gone60", 0, 60*kb), mk("gone30", 0, 30*kb)
	mk("live40", 40*kb, 0)
	b.SampleUnsent(nil)
	a.MarkEvicted()
	c.MarkEvicted()
	b.Check()
	if got, want := ev.snapshot(), []string{"gone30:reclaim", "gone60:reclaim", "live40:global_ceiling"}; !slices.Equal(got, want) {
		t.Fatalf("far over: evicted %v, want %v", got, want)
	}
}

// What the kernel holds toward a backend counts apart from what it holds
// toward clients (ToUpstream), and over the ceiling a connection is
// weighed by both its queues (Tie): the one whose backend holds most goes
// first, as ReasonUpstreamCeiling; one whose own queue holds most stays
// ReasonGlobalCeiling.
func TestUpstreamUnsentAndTie(t *testing.T) {
	b := NewBudget(BudgetConfig{Ceiling: 300 * kb})
	upCfg := &Config{Policy: Pause, MaxMessages: 8, MaxBytes: 256 * kb, LowWater: 0.5, ToUpstream: true}
	var ev evictions
	mk := func(name string, own int, towardBackend int64) (client, up *Queue) {
		client = NewQueue(clientCfg(), b, ev.hook(name))
		up = NewQueue(upCfg, b, nil)
		t.Cleanup(client.Close)
		t.Cleanup(up.Close)
		up.OnUnsent(func() int64 { return towardBackend })
		mustPush(t, up, msg(1, 16))
		take(t, up, 1, 1<<20) // a write, so that it is sampled
		client.Tie(up)
		if own > 0 {
			fillBytes(t, client, own)
		}
		return client, up
	}
	_, deaf := mk("deaf", 0, 200*kb)
	mk("slow", 150*kb, 0)
	mk("small", 0, 10*kb)
	b.SampleUnsent(nil)
	st := b.Stats()
	if st.UpstreamUnsentBytes != 210*kb || st.UnsentBytes != 0 || st.QueuedBytes != 360*kb {
		t.Fatalf("Stats: upstream unsent %d, unsent %d, queued %d; want %d, 0, %d", st.UpstreamUnsentBytes, st.UnsentBytes, st.QueuedBytes, 210*kb, 360*kb)
	}
	if deaf.Bytes() != 200*kb {
		t.Fatalf("the deaf backend's queue holds %d, want its kernel share %d", deaf.Bytes(), 200*kb)
	}
	// 360 KiB over a 300 KiB ceiling: the deaf backend's session, the
	// largest, is enough.
	b.Check()
	if got, want := ev.snapshot(), []string{"deaf:upstream_ceiling"}; !slices.Equal(got, want) {
		t.Fatalf("evicted %v, want %v", got, want)
	}
	// Its backend's share is on its way out: not picked again, and no
	// other session goes for it.
	b.Check()
	if got, want := ev.snapshot(), []string{"deaf:upstream_ceiling"}; !slices.Equal(got, want) {
		t.Fatalf("after a second check: evicted %v, want %v", got, want)
	}
	deaf.Close()
	if st := b.Stats(); st.UpstreamUnsentBytes != 10*kb {
		t.Fatalf("after the deaf backend's queue closed: upstream unsent %d, want %d", st.UpstreamUnsentBytes, 10*kb)
	}
}
