package demo

import (
	"math"
	"math/bits"
	"sync/atomic"
	"time"
)

// --- latency histogram ---

// latencyHist counts latencies in logarithmic buckets, latSub per power of
// two from 1 µs, so a quantile is off by at most 1/latSub (12.5%). It is
// safe for concurrent use: adding is three atomic operations.
type latencyHist struct {
	counts [latBuckets]atomic.Uint64
	n      atomic.Uint64
	max    atomic.Int64
}

const (
	latSub     = 8
	latBuckets = 40 * latSub // up to 2^40 µs, about 12 days
)

func latBucket(d time.Duration) int {
	us := uint64(max(d.Microseconds(), 1))
	l := bits.Len64(us) - 1 // floor(log2(us))
	var sub uint64
	if l >= 3 {
		sub = (us >> (l - 3)) & (latSub - 1)
	} else {
		sub = (us << (3 - l)) & (latSub - 1)
	}
	return min(l*latSub+int(sub), latBuckets-1)
}

// latUpper is the upper bound of bucket i.
func latUpper(i int) time.Duration {
	l, sub := i/latSub, i%latSub
	return time.Duration((uint64(latSub+sub+1)<<l)/latSub) * time.Microsecond
}

func (h *latencyHist) add(d time.Duration) {
	h.counts[latBucket(d)].Add(1)
	h.n.Add(1)
	atomicMax(&h.max, int64(d))
}

func (h *latencyHist) count() uint64             { return h.n.Load() }
func (h *latencyHist) maxLatency() time.Duration { return time.Duration(h.max.Load()) }

// quantile returns the q-quantile (0 < q <= 1), rounded up to its bucket's
// upper bound and capped at the maximum; 0 when empty.
func (h *latencyHist) quantile(q float64) time.Duration {
	n := h.n.Load()
	if n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(n)))
	var seen uint64
	for i := range h.counts {
		seen += h.counts[i].Load()
		if seen >= rank {
			return min(latUpper(i), h.maxLatency())
		}
	}
	return h.maxLatency()
}
