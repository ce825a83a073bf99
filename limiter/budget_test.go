package limiter

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"runtime"
	"slices"
	"sync"
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

func clientCfg(slowDepth int) *Config {
	return &Config{Policy: Evict, MaxMessages: 1000, MaxBytes: 1 << 30, LowWater: 0.5, SlowDepth: slowDepth}
}

func TestBudgetAccounting(t *testing.T) {
	b := NewBudget(BudgetConfig{Ceiling: 1 << 30, SlowRatio: 0.5})
	client := NewQueue(clientCfg(100), b, nil)
	dropper := NewQueue(&Config{Policy: Drop, MaxMessages: 4, MaxBytes: 1 << 20, LowWater: 0.5, KeepNewest: 2, SlowDepth: 100}, b, nil)
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
		t.Fatalf("Connections = %d, want 2: only queues with a SlowDepth count", st.Connections)
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

func TestBudgetSlowCount(t *testing.T) {
	b := NewBudget(BudgetConfig{SlowRatio: 0.5})
	q1 := NewQueue(clientCfg(3), b, nil)
	q2 := NewQueue(clientCfg(3), b, nil)
	defer q2.Close()
	slow := func(want int, step string) {
		t.Helper()
		if got := b.Stats().Slow; got != want {
			t.Fatalf("%s: Slow = %d, want %d", step, got, want)
		}
	}
	fillMessages(t, q1, 2)
	slow(0, "depth 2")
	mustPush(t, q1, msg(3, 16))
	slow(1, "depth 3")
	mustPush(t, q1, msg(4, 16))
	slow(1, "depth 4")
	take(t, q1, 2, 1<<20)
	slow(0, "taken down to 2")
	mustPush(t, q1, dataSeg(5, 16, true, false))
	slow(1, "a started message counts")
	take(t, q1, 3, 1<<20) // the start of 5 is taken, not its end
	slow(0, "taken down to the message in progress")
	mustPush(t, q1, dataSeg(6, 16, false, true))
	fillMessages(t, q1, 2)
	slow(1, "back to 3")
	fillMessages(t, q2, 3)
	slow(2, "two slow queues")
	q1.Close()
	slow(1, "a slow queue closed")
	q2.PushClose(closeSeg(), true)
	slow(0, "a priority close discards the data")
}

func TestBudgetSlowCountDrop(t *testing.T) {
	b := NewBudget(BudgetConfig{SlowRatio: 0.5})
	q := NewQueue(&Config{Policy: Drop, MaxMessages: 5, MaxBytes: 1 << 20, LowWater: 0.5, KeepNewest: 2, SlowDepth: 4}, b, nil)
	defer q.Close()
	fillMessages(t, q, 5)
	if got := b.Stats().Slow; got != 1 {
		t.Fatalf("Slow = %d at depth 5, want 1", got)
	}
	mustPush(t, q, msg(9, 16)) // drops down to KeepNewest
	if q.Messages() != 2 || b.Stats().Slow != 0 {
		t.Fatalf("after a drop: depth %d, Slow %d; want 2 and 0", q.Messages(), b.Stats().Slow)
	}
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
				q := NewQueue(clientCfg(1000), b, ev.hook(name))
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

func TestBudgetCheckSlowRatio(t *testing.T) {
	tests := []struct {
		name   string
		ratio  float64
		conns  int
		depths []int // of the slow queues, named s<depth>; the rest are at depth 1
		want   []string
	}{
		{"three of four", 0.05, 20, []int{6, 10, 4, 8}, []string{"s10:slow_ratio", "s6:slow_ratio", "s8:slow_ratio"}},
		{"one slow is allowed", 0.05, 20, []int{10}, nil},
		{"two slow, one allowed", 0.05, 20, []int{5, 7}, []string{"s7:slow_ratio"}},
		{"few connections allow one", 0.05, 3, []int{5, 7}, []string{"s7:slow_ratio"}},
		{"ratio allows two", 0.1, 20, []int{6, 10, 4, 8}, []string{"s10:slow_ratio", "s8:slow_ratio"}},
		{"within the ratio", 0.25, 20, []int{6, 10, 4, 8}, nil},
		{"ratio off", 0, 20, []int{6, 10, 4, 8}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := NewBudget(BudgetConfig{SlowRatio: tt.ratio})
			var ev evictions
			for i := range tt.conns {
				name, depth := fmt.Sprintf("fast%d", i), 1
				if i < len(tt.depths) {
					name, depth = fmt.Sprintf("s%d", tt.depths[i]), tt.depths[i]
				}
				q := NewQueue(clientCfg(4), b, ev.hook(name))
				defer q.Close()
				fillMessages(t, q, depth)
			}
			slow := 0
			for _, d := range tt.depths {
				if d >= 4 {
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
			b.Check() // the evicted ones still count as slow until they close
			if got := ev.snapshot(); !slices.Equal(got, tt.want) {
				t.Fatalf("second Check: evicted %v, want %v", got, tt.want)
			}
		})
	}
}

// Queues of two kinds share a Budget: a deep queue that is not slow by its
// own SlowDepth must not hide the slow ones behind it.
func TestBudgetCheckSlowMixedDepths(t *testing.T) {
	b := NewBudget(BudgetConfig{SlowRatio: 0.05})
	var ev evictions
	deep := NewQueue(clientCfg(100), b, ev.hook("deep"))
	defer deep.Close()
	fillMessages(t, deep, 50)
	for _, depth := range []int{5, 7} {
		q := NewQueue(clientCfg(4), b, ev.hook(fmt.Sprintf("s%d", depth)))
		defer q.Close()
		fillMessages(t, q, depth)
	}
	b.Check()
	if got, want := ev.snapshot(), []string{"s7:slow_ratio"}; !slices.Equal(got, want) {
		t.Fatalf("evicted %v, want %v", got, want)
	}
}

func TestBudgetAllowedSlow(t *testing.T) {
	for _, tt := range []struct {
		ratio float64
		conns int
		want  int
	}{
		{0.05, 0, 1}, {0.05, 19, 1}, {0.05, 20, 1}, {0.05, 40, 2}, {0.1, 20, 2}, {0.5, 7, 3}, {1, 5, 5},
	} {
		b := NewBudget(BudgetConfig{SlowRatio: tt.ratio})
		for range tt.conns {
			q := NewQueue(clientCfg(4), b, nil)
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
	big := NewQueue(clientCfg(4), b, ev.hook("big"))
	defer big.Close()
	fillBytes(t, big, 6*64*kb) // six messages: slow and over the ceiling
	for _, depth := range []int{5, 8} {
		q := NewQueue(clientCfg(4), b, ev.hook(fmt.Sprintf("s%d", depth)))
		defer q.Close()
		fillMessages(t, q, depth)
	}
	for range 17 {
		q := NewQueue(clientCfg(4), b, ev.hook("fast"))
		defer q.Close()
	}
	// 20 connections allow one slow; three are. big goes for the ceiling
	// and is one of the two too many; s8, the deepest, is the other.
	b.Check()
	want := []string{"big:global_ceiling", "s8:slow_ratio"}
	if got := ev.snapshot(); !slices.Equal(got, want) {
		t.Fatalf("evicted %v, want %v", got, want)
	}
}

func TestBudgetEach(t *testing.T) {
	b := NewBudget(BudgetConfig{})
	var made []*Queue
	for range 3 {
		q := NewQueue(clientCfg(4), b, nil)
		defer q.Close()
		made = append(made, q)
	}
	up := NewQueue(clientCfg(0), b, nil) // not counted
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
		q := NewQueue(clientCfg(100), b, func(r Reason) { evicted <- r })
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
		q := NewQueue(&Config{Policy: Evict, MaxMessages: 64, MaxBytes: 32 * kb, LowWater: 0.5, SlowDepth: 8},
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
		q := NewQueue(clientCfg(4), bud, nil)
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
	cfg.MaxMessages, cfg.MaxBytes, cfg.SlowDepth = 100, 1<<20, 5 // slow at 50 KiB unsent
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
		q := NewQueue(clientCfg(1000), b, ev.hook(name))
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
		client = NewQueue(clientCfg(1000), b, ev.hook(name))
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
