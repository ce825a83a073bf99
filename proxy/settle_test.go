package proxy

import (
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// TestSetupGC checks when the post-burst collection runs: once per burst,
// only after setups have stopped for the quiet time, never for a burst
// smaller than its bound, and never after stop.
func TestSetupGC(t *testing.T) {
	for _, tc := range []struct {
		name     string
		sessions int
		burst    int // setups, one per gap
		gap      time.Duration
		stop     bool  // stop before the burst ends
		want     int64 // collections
	}{
		{name: "burst then quiet", sessions: 1000, burst: 300, gap: time.Millisecond, want: 1},
		{name: "below minBurst", sessions: 100, burst: 100, gap: time.Millisecond, want: 0},
		{name: "below a quarter of the sessions", sessions: 4000, burst: 900, gap: time.Millisecond, want: 0},
		{name: "steady churn never quiet", sessions: 1000, burst: 600, gap: setupQuiet / 2, want: 0},
		{name: "stopped", sessions: 1000, burst: 300, gap: time.Millisecond, stop: true, want: 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				var n atomic.Int64
				g := newSetupGC(func() int { return tc.sessions })
				g.collect = func() { n.Add(1) }
				for range tc.burst {
					g.setUp()
					time.Sleep(tc.gap)
				}
				if tc.stop {
					g.stop()
				}
				// Churn ends only now: look for 3 quiet windows.
				if got := n.Load(); got != 0 && tc.gap >= setupQuiet/2 {
					t.Fatalf("collected %d times during steady churn", got)
				}
				if tc.gap >= setupQuiet/2 {
					g.stop() // the churn case asks only about the churn itself
				}
				time.Sleep(3 * setupQuiet)
				synctest.Wait()
				if got := n.Load(); got != tc.want {
					t.Fatalf("collected %d times, want %d", got, tc.want)
				}
				// A second burst as large collects once more.
				if tc.want == 1 {
					for range tc.burst {
						g.setUp()
					}
					time.Sleep(3 * setupQuiet)
					synctest.Wait()
					if got := n.Load(); got != 2 {
						t.Fatalf("after a second burst: collected %d times, want 2", got)
					}
				}
				g.stop()
			})
		})
	}
}
