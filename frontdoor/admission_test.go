package frontdoor

import (
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// bucketStep sleeps, then tries n times and wants `want` of them allowed.
type bucketStep struct {
	sleep   time.Duration
	n, want int
}

var bucketTests = []struct {
	name         string
	rate, burst  int
	steps        []bucketStep
	concurrently bool
}{
	{"burst then one per interval", 10, 10, []bucketStep{
		{0, 15, 10}, {100 * time.Millisecond, 5, 1}, {50 * time.Millisecond, 1, 0},
		{50 * time.Millisecond, 1, 1}, {time.Second, 20, 10}, {10 * time.Second, 20, 10},
	}, false},
	{"one per second", 1, 1, []bucketStep{
		{0, 3, 1}, {999 * time.Millisecond, 1, 0}, {time.Millisecond, 1, 1}, {time.Hour, 2, 1},
	}, false},
	{"burst smaller than rate", 100, 5, []bucketStep{{0, 10, 5}, {50 * time.Millisecond, 10, 5}}, false},
	{"a million a second", 1_000_000, 1_000_000, []bucketStep{
		{0, 1_000_100, 1_000_000}, {time.Millisecond, 2000, 1000},
	}, false},
	{"concurrent takers share the burst", 50, 50, []bucketStep{{0, 800, 50}, {time.Second, 800, 50}}, true},
}

func TestTokenBucket(t *testing.T) {
	for _, tt := range bucketTests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				b := newTokenBucket(tt.rate, tt.burst)
				for i, st := range tt.steps {
					time.Sleep(st.sleep)
					var got atomic.Int64
					if tt.concurrently {
						// Time stands still in the bubble while the
						// goroutines run: exactly the burst gets through.
						var wg sync.WaitGroup
						for range 8 {
							wg.Go(func() {
								for range st.n / 8 {
									if b.allow() {
										got.Add(1)
									}
								}
							})
						}
						wg.Wait()
					} else {
						for range st.n {
							if b.allow() {
								got.Add(1)
							}
						}
					}
					if int(got.Load()) != st.want {
						t.Errorf("step %d (after %v): %d of %d allowed, want %d", i, st.sleep, got.Load(), st.n, st.want)
					}
				}
			})
		})
	}
}

func BenchmarkTokenBucket(b *testing.B) {
	bk := newTokenBucket(1_000_000, 1_000_000)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			bk.allow()
		}
	})
}

func TestRejectLog(t *testing.T) {
	ms := time.Millisecond
	steps := []struct {
		at      time.Duration
		times   int
		lines   int    // lines logged among these notes
		counted uint64 // sum of their counts
	}{
		{0, 1, 1, 1},            // the first refusal is logged at once
		{10 * ms, 999, 0, 0},    // a burst within the second is not
		{999 * ms, 1, 0, 0},     //
		{1000 * ms, 1, 1, 1001}, // the next line counts all of them
		{1500 * ms, 5, 0, 0},
		{3000 * ms, 2, 1, 6},
		{3001 * ms, 1, 0, 0},
	}
	var l RejectLog
	for _, st := range steps {
		lines, counted := 0, uint64(0)
		for range st.times {
			if n, ok := l.Note(st.at); ok {
				lines++
				counted += n
			}
		}
		if lines != st.lines || counted != st.counted {
			t.Errorf("at %v ×%d: %d lines counting %d, want %d lines counting %d", st.at, st.times, lines, counted, st.lines, st.counted)
		}
	}

	// Concurrent refusals at one instant: one line, and nothing lost.
	var c RejectLog
	var lines, counted atomic.Uint64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 1000 {
				if n, ok := c.Note(time.Second); ok {
					lines.Add(1)
					counted.Add(n)
				}
			}
		})
	}
	wg.Wait()
	n, _ := c.Note(3 * time.Second)
	if lines.Load() != 1 || counted.Load()+n != 8001 {
		t.Errorf("concurrent: %d lines, %d+%d counted; want 1 line, 8001 in all", lines.Load(), counted.Load(), n)
	}
}
