// Package latency holds the latency histogram that the demo and the load
// harness both report from: fixed memory whatever the count, safe for
// concurrent use, quantiles that never understate.
package latency

import (
	"math"
	"math/bits"
	"sync/atomic"
	"time"
)

// subBits sets the resolution: 1<<subBits buckets per power of two, so a
// quantile is at most 1/32 (about 3%) above the true value.
const (
	subBits    = 5
	subBuckets = 1 << subBits
	buckets    = 64 * subBuckets
)

// Histogram counts durations in microseconds in log-linear buckets: exact
// below 64 µs, then 32 buckets per power of two. The zero value is ready to
// use; adding is three atomic operations, so clients may share one.
type Histogram struct {
	counts [buckets]atomic.Uint64
	n      atomic.Uint64
	max    atomic.Int64 // µs
}

// bucketOf is the bucket of a value in µs (not negative).
func bucketOf(us int64) int {
	shift := max(bits.Len64(uint64(us))-(subBits+1), 0)
	return min(shift*subBuckets+int(us>>shift), buckets-1)
}

// upper is the largest value, in µs, that bucket b holds.
func upper(b int) int64 {
	if b < 2*subBuckets {
		return int64(b)
	}
	shift := b/subBuckets - 1
	low := int64(b-shift*subBuckets) << shift
	return low + int64(1)<<shift - 1
}

// Record adds d; a negative duration (a clock step) counts as 0.
func (h *Histogram) Record(d time.Duration) {
	us := max(d.Microseconds(), 0)
	h.counts[bucketOf(us)].Add(1)
	h.n.Add(1)
	for {
		cur := h.max.Load()
		if us <= cur || h.max.CompareAndSwap(cur, us) {
			return
		}
	}
}

// Merge adds o's counts to h. o must not change meanwhile.
func (h *Histogram) Merge(o *Histogram) {
	for i := range o.counts {
		if c := o.counts[i].Load(); c > 0 {
			h.counts[i].Add(c)
		}
	}
	h.n.Add(o.n.Load())
	for m := o.max.Load(); ; {
		cur := h.max.Load()
		if m <= cur || h.max.CompareAndSwap(cur, m) {
			return
		}
	}
}

// Count is the number of durations recorded.
func (h *Histogram) Count() uint64 { return h.n.Load() }

// Max is the largest duration recorded, to the microsecond; 0 when empty.
func (h *Histogram) Max() time.Duration { return time.Duration(h.max.Load()) * time.Microsecond }

// Quantile returns the q-quantile (0 < q <= 1), rounded up to its bucket's
// upper bound and capped at the maximum; 0 when empty.
func (h *Histogram) Quantile(q float64) time.Duration {
	n := h.n.Load()
	if n == 0 {
		return 0
	}
	rank := max(uint64(math.Ceil(q*float64(n))), 1)
	var seen uint64
	for b := range h.counts {
		seen += h.counts[b].Load()
		if seen >= rank {
			return min(time.Duration(upper(b))*time.Microsecond, h.Max())
		}
	}
	return h.Max()
}
