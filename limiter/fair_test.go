package limiter

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

func TestFairReserve(t *testing.T) {
	for _, tc := range []struct {
		name         string
		rate, burst  int64
		interval     time.Duration
		nows         []int64         // one client's calls
		want         []time.Duration // its waits
		clientsApart bool            // each call from a client of its own
	}{
		{name: "off", rate: 0, nows: []int64{0, 0, 0}, want: []time.Duration{0, 0, 0}},
		{name: "burst then the interval", rate: 10, burst: 3, interval: 100 * time.Millisecond,
			nows: []int64{0, 0, 0, 0, 0, 150e6},
			want: []time.Duration{0, 0, 0, 100e6, 200e6, 150e6}},
		{name: "idle refills the burst", rate: 10, burst: 2, interval: 100 * time.Millisecond,
			nows: []int64{0, 0, 0, 10 * sec, 10 * sec, 10 * sec},
			want: []time.Duration{0, 0, 100e6, 0, 0, 100e6}},
		{name: "default burst is a tenth of a second", rate: 100, interval: 10 * time.Millisecond,
			nows: []int64{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
			want: []time.Duration{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10e6}},
		{name: "interval rounds to the nearest nanosecond", rate: 3, burst: 1, interval: 333333333,
			nows: []int64{0, 0}, want: []time.Duration{0, 333333333}},
		{name: "huge rate", rate: 1 << 62, burst: 1, interval: 1,
			nows: []int64{5, 5, 5}, want: []time.Duration{0, 1, 2}},
		{name: "slots are shared across clients", rate: 10, burst: 1, interval: 100 * time.Millisecond,
			nows: []int64{0, 0, 0}, want: []time.Duration{0, 100e6, 200e6}, clientsApart: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := NewFair(tc.rate, tc.burst)
			if got := f.Interval(); got != tc.interval {
				t.Fatalf("Interval = %v, want %v", got, tc.interval)
			}
			var c FairClient
			for i, now := range tc.nows {
				if tc.clientsApart {
					c = FairClient{}
				}
				if got := f.Reserve(&c, now); got != tc.want[i] {
					t.Fatalf("call %d at %v: wait %v, want %v", i, time.Duration(now), got, tc.want[i])
				}
			}
		})
	}
}

// TestFairCapConcurrent has many readers book at once, each at its own
// pace, and checks the cap over every prefix of the send times: the k-th
// message sent is no earlier than (k-burst+1) intervals, and each client's
// messages keep their order.
func TestFairCapConcurrent(t *testing.T) {
	const (
		readers = 16
		each    = 2000
		rate    = 1000
		burst   = 50
	)
	f := NewFair(rate, burst)
	sends := make([][]int64, readers)
	var wg sync.WaitGroup
	for r := range readers {
		wg.Go(func() {
			var c FairClient
			now := int64(r) * 1e6
			for i := range each {
				d := f.Reserve(&c, now)
				if d < 0 {
					t.Errorf("negative wait %v", d)
					return
				}
				send := now + int64(d)
				if i > 0 && send < sends[r][i-1] {
					t.Errorf("reader %d: message %d sent at %d before message %d at %d", r, i, send, i-1, sends[r][i-1])
					return
				}
				sends[r] = append(sends[r], send)
				// Half the readers wait their turn, half read ahead.
				if r%2 == 0 {
					now = send
				}
				now += int64(i%7) * 1e5
			}
		})
	}
	wg.Wait()
	all := slices.Sorted(slices.Values(slices.Concat(sends...)))
	interval := int64(f.Interval())
	for k, s := range all {
		if floor := int64(k-burst+1) * interval; s < floor {
			t.Fatalf("message %d sent at %v, before %v: over the cap", k, time.Duration(s), time.Duration(floor))
		}
	}
}

// fairRun runs readers inside a synctest bubble for d of simulated time and
// returns how many messages each forwarded. A reader with period 0 is
// greedy; otherwise it wants one message every period.
func fairRun(t *testing.T, f *Fair, periods []time.Duration, d time.Duration) []int {
	t.Helper()
	got := make([]int, len(periods))
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		clock := func() int64 { return int64(time.Since(start)) }
		var wg sync.WaitGroup
		for i, period := range periods {
			wg.Go(func() {
				var c FairClient
				// Quiet readers start out of step with each other.
				next := time.Duration(i) * time.Millisecond
				for {
					if period > 0 {
						time.Sleep(next - time.Since(start))
						next += period
					}
					time.Sleep(f.Reserve(&c, clock()))
					if time.Since(start) >= d {
						return
					}
					got[i]++
				}
			})
		}
		wg.Wait()
	})
	return got
}

func TestFairFlooderLeavesQuietClientsTheirShare(t *testing.T) {
	const (
		rate  = 200
		quiet = 10
		secs  = 60
	)
	periods := make([]time.Duration, 1+quiet)
	for i := 1; i <= quiet; i++ {
		periods[i] = 200 * time.Millisecond // 5 messages a second
	}
	got := fairRun(t, NewFair(rate, 0), periods, secs*time.Second)
	total := 0
	for i, n := range got {
		total += n
		if i > 0 && n < 5*secs*95/100 {
			t.Errorf("quiet client %d got %d messages, want its demand of %d", i, n, 5*secs)
		}
	}
	if want := rate*secs - quiet*5*secs; got[0] < want*95/100 {
		t.Errorf("flooder got %d messages, want the rest, about %d", got[0], want)
	}
	if total < rate*secs*95/100 || total > rate*secs*105/100 {
		t.Errorf("%d messages in all, want the cap of %d ±5%%", total, rate*secs)
	}
	t.Logf("flooder %d, quiet %v, total %d", got[0], got[1:], total)
}

func TestFairGreedyClientsShareEqually(t *testing.T) {
	const (
		rate = 400
		secs = 30
	)
	for _, n := range []int{2, 8, 50} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			got := fairRun(t, NewFair(rate, 0), make([]time.Duration, n), secs*time.Second)
			share := rate * secs / n
			for i, m := range got {
				if m < share*80/100 || m > share*120/100 {
					t.Errorf("client %d got %d messages, want cap/N = %d ±20%%", i, m, share)
				}
			}
			t.Logf("share %d, got %v", share, got)
		})
	}
}

func BenchmarkFairReserve(b *testing.B) {
	for _, bc := range []struct {
		name string
		f    *Fair
	}{
		{"off", NewFair(0, 0)},
		{"on", NewFair(1e6, 0)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			var c FairClient
			var now int64
			for b.Loop() {
				now += 1000
				bc.f.Reserve(&c, now)
			}
		})
	}
}

// BenchmarkFairReserveParallel has every goroutine book on one Fair, the
// contended case of many readers under one cap.
func BenchmarkFairReserveParallel(b *testing.B) {
	f := NewFair(1e6, 0)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		var c FairClient
		var now int64
		for pb.Next() {
			now += 1000
			f.Reserve(&c, now)
		}
	})
}
