package limiter

import (
	"cmp"
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Reason says why the Budget's guard evicted a connection.
type Reason uint8

const (
	// ReasonGlobalCeiling: the sum of all queues passed the ceiling and this
	// queue was among the largest.
	ReasonGlobalCeiling Reason = iota + 1
	// ReasonSlowRatio: too many connections were slow and this one was
	// among the slowest.
	ReasonSlowRatio
	// ReasonReclaim: the connection was evicted already, but what it still
	// holds (the kernel's share, while the client does not read its close)
	// is needed back: the queues are over the ceiling.
	ReasonReclaim
	// ReasonUpstreamCeiling: the queues passed the ceiling and this
	// connection was among the largest, mostly toward its backend (Tie):
	// the backend, not the client, is not reading.
	ReasonUpstreamCeiling
)

func (r Reason) String() string {
	switch r {
	case ReasonGlobalCeiling:
		return "global_ceiling"
	case ReasonSlowRatio:
		return "slow_ratio"
	case ReasonReclaim:
		return "reclaim"
	case ReasonUpstreamCeiling:
		return "upstream_ceiling"
	}
	return "unknown"
}

// BudgetConfig bounds all queues together.
type BudgetConfig struct {
	// Ceiling is the most bytes all queues may hold together; 0 means no
	// ceiling.
	Ceiling int64
	// SlowRatio is the share of connections that may be slow at once
	// (0 < SlowRatio <= 1); at least MinAllowedSlow are always allowed, so
	// a small fleet is not held to one stalled client.
	SlowRatio float64
	// ObserveWait, if set, is given the time each message waited in a queue.
	ObserveWait func(time.Duration)
}

// Budget counts what every queue holds and runs the guards that evict the
// worst offenders when the process as a whole is in danger. Counting costs
// an atomic add per change; the guards look at the queues only when a
// bound is broken.
type Budget struct {
	cfg BudgetConfig

	queued atomic.Int64
	unsent atomic.Int64 // part of queued: in kernel send buffers toward clients
	// upstreamUnsent is part of queued: in kernel send buffers toward
	// backends (Config.ToUpstream).
	upstreamUnsent atomic.Int64
	slow           atomic.Int64
	paused         atomic.Int64
	pauseNanos     atomic.Int64
	dropped        atomic.Uint64

	mu     sync.Mutex
	queues map[*Queue]struct{} // guarded by mu

	// due lists the queues SampleUnsent is to sample: written since the
	// last sample, or still holding bytes in the kernel then. Walking
	// every queue each GuardInterval was the largest part of an idle
	// proxy's CPU (a map walk of all connections 20 times a second).
	dueMu sync.Mutex
	due   []*Queue // guarded by dueMu

	// clock is monotonic nanoseconds: when messages are queued and the
	// guard samples. Tests of slowness set their own before the first
	// queue, so that they run minutes of samples in a moment.
	clock func() int64
}

// NewBudget returns a Budget with cfg's bounds.
func NewBudget(cfg BudgetConfig) *Budget {
	return &Budget{cfg: cfg, queues: make(map[*Queue]struct{}), clock: now}
}

// Stats is a snapshot of the Budget's counters.
type Stats struct {
	Connections int   // queues counted for the slow ratio
	QueuedBytes int64 // bytes in all queues, UnsentBytes included
	UnsentBytes int64 // bytes the kernel holds unacknowledged for the counted connections' clients
	// UpstreamUnsentBytes is what the kernel holds unacknowledged for
	// their backends; QueuedBytes includes it.
	UpstreamUnsentBytes int64
	Ceiling             int64         // BudgetConfig.Ceiling
	Slow                int           // connections that took nothing for SlowAge (progress.go)
	Paused              int           // producers waiting for room
	PausedTime          time.Duration // total time producers have waited, ended pauses
	DroppedTotal        uint64        // messages discarded by the Drop policy
	AllowedSlow         int           // how many slow connections the ratio allows now
	SlowThreshold       float64       // BudgetConfig.SlowRatio
}

// Stats returns the current counters.
func (b *Budget) Stats() Stats {
	b.mu.Lock()
	n := len(b.queues)
	b.mu.Unlock()
	return Stats{
		Connections:         n,
		QueuedBytes:         b.queued.Load(),
		UnsentBytes:         b.unsent.Load(),
		UpstreamUnsentBytes: b.upstreamUnsent.Load(),
		Ceiling:             b.cfg.Ceiling,
		Slow:                int(b.slow.Load()),
		Paused:              int(b.paused.Load()),
		PausedTime:          time.Duration(b.pauseNanos.Load()),
		DroppedTotal:        b.dropped.Load(),
		AllowedSlow:         b.allowedSlow(n),
		SlowThreshold:       b.cfg.SlowRatio,
	}
}

// MinAllowedSlow is how many slow connections the ratio guard always
// allows, whatever the ratio: 0.5% of 200 connections is one, and a second
// client on a bad mobile link would then evict one of the two. Slow means
// stalled for SlowAge, so a few at once are clients in trouble, not a
// danger to the process; the ceiling still bounds what they hold.
const MinAllowedSlow = 4

func (b *Budget) allowedSlow(conns int) int {
	return max(MinAllowedSlow, int(b.cfg.SlowRatio*float64(conns)))
}

func (b *Budget) register(q *Queue) {
	b.mu.Lock()
	b.queues[q] = struct{}{}
	b.mu.Unlock()
}

func (b *Budget) unregister(q *Queue) {
	b.mu.Lock()
	delete(b.queues, q)
	b.mu.Unlock()
}

// Each calls f for every counted queue, under the Budget's lock: f must be
// quick and must not call back into the Budget.
func (b *Budget) Each(f func(*Queue)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for q := range b.queues {
		f(q)
	}
}

// GuardInterval is how often Guard checks the bounds; the guards react
// within two intervals.
const GuardInterval = 50 * time.Millisecond

// Guard samples what the kernel holds unsent for each connection that
// wrote lately and checks the global bounds, every GuardInterval until ctx
// ends.
func (b *Budget) Guard(ctx context.Context) {
	t := time.NewTicker(GuardInterval)
	defer t.Stop()
	var scratch []*Queue
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			scratch = b.SampleUnsent(scratch[:0])
			b.Check()
		}
	}
}

// SampleUnsent asks the kernel, through each queue's OnUnsent function,
// how much it holds unacknowledged for the connections that wrote since
// the last sample or still had something waiting then, so that Bytes and
// the ceiling include it, and decides which of them are slow (progress.go).
// Only those queues are visited (the due list): an idle connection costs
// the guard nothing. The system calls run outside any lock; scratch is
// reused between calls and returned.
func (b *Budget) SampleUnsent(scratch []*Queue) []*Queue { return b.sampleAt(b.clock(), scratch) }

// sampleAt is SampleUnsent with the samples taken as of t.
func (b *Budget) sampleAt(t int64, scratch []*Queue) []*Queue {
	b.dueMu.Lock()
	list := b.due
	b.due = scratch[:0]
	b.dueMu.Unlock()
	for i, q := range list {
		q.due.Store(false)
		if q.sample(t) {
			b.markDue(q) // the kernel still holds some: look again
		}
		list[i] = nil
	}
	return list[:0]
}

// markDue puts q on the list of queues to sample next time, once.
func (b *Budget) markDue(q *Queue) {
	if q.due.Load() || !q.due.CompareAndSwap(false, true) {
		return
	}
	b.dueMu.Lock()
	b.due = append(b.due, q)
	b.dueMu.Unlock()
}

// Check runs both guards once: if the queues together hold more than the
// ceiling, the largest are evicted until the rest fit; if more connections
// are slow than the ratio allows, the slowest are evicted. Queues already
// evicted are not counted twice.
func (b *Budget) Check() {
	overCeiling := b.cfg.Ceiling > 0 && b.queued.Load() > b.cfg.Ceiling
	var tooSlow bool
	if b.cfg.SlowRatio > 0 {
		if s := b.slow.Load(); s > MinAllowedSlow {
			b.mu.Lock()
			tooSlow = int(s) > b.allowedSlow(len(b.queues))
			b.mu.Unlock()
		}
	}
	if !overCeiling && !tooSlow {
		return
	}
	cands, evicted, freeing, conns := b.candidates()
	if overCeiling {
		b.overCeiling(cands, evicted, freeing)
	}
	if tooSlow {
		b.tooSlow(cands, conns)
	}
	for _, c := range cands {
		if c.reason != 0 && c.q.MarkEvicted() && c.q.onEvict != nil {
			c.q.onEvict(c.reason)
		}
	}
}

// candidate is a queue the guards may pick.
type candidate struct {
	q       *Queue
	bytes   int64  // the queue's and its tied queue's (upBytes)
	upBytes int64  // the tied queue's, toward the backend
	reason  Reason // 0: stays
}

// candidates lists the live queues, and the evicted ones whose kernel
// share could be taken back, with freeing, the bytes on their way out
// anyway, and the number of connections counted.
func (b *Budget) candidates() (live, evicted []candidate, freeing int64, conns int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for q := range b.queues {
		c := candidate{q: q, bytes: q.Bytes()}
		up := q.tiedBytes()
		if !q.evicted.Load() {
			c.upBytes = up
			c.bytes += up
			live = append(live, c)
			continue
		}
		// Its backend's share leaves with the session: sluice closes the
		// upstream leg behind it, or, for ReasonUpstreamCeiling, ahead
		// of it within a second.
		freeing += up
		// On its way out, and no longer counted slow (MarkEvicted). Its
		// queue is discarded as it is evicted; what the kernel holds for
		// it stays until its client reads or the socket is reset
		// (ReasonReclaim).
		unsent := q.Unsent()
		if q.reclaimed.Load() {
			freeing += c.bytes
			continue
		}
		freeing += c.bytes - unsent
		if unsent > 0 {
			evicted = append(evicted, candidate{q: q, bytes: unsent})
		}
	}
	return live, evicted, freeing, len(b.queues)
}

// overCeiling picks what goes to bring the queues under the ceiling: first
// what evicted connections still hold in the kernel (their clients are
// not reading, and their close frames cannot pass it), taken back at once,
// then the live queues, largest first.
func (b *Budget) overCeiling(live, evicted []candidate, freeing int64) {
	total := b.queued.Load() - freeing
	slices.SortFunc(evicted, func(x, y candidate) int { return cmp.Compare(y.bytes, x.bytes) })
	for _, c := range evicted {
		if total <= b.cfg.Ceiling {
			break
		}
		total -= c.bytes
		if c.q.reclaimed.CompareAndSwap(false, true) && c.q.onEvict != nil {
			c.q.onEvict(ReasonReclaim)
		}
	}
	slices.SortFunc(live, func(x, y candidate) int { return cmp.Compare(y.bytes, x.bytes) })
	for i := range live {
		c := &live[i]
		if total <= b.cfg.Ceiling || c.bytes == 0 {
			break
		}
		total -= c.bytes
		c.reason = ReasonGlobalCeiling
		if 2*c.upBytes > c.bytes {
			c.reason = ReasonUpstreamCeiling
		}
	}
}

// tooSlow picks the slow live queues, the longest stalled first, until no
// more are slow than the ratio allows. Only slow queues are picked: a
// client that keeps up is never evicted by this guard, however deep its
// queue.
func (b *Budget) tooSlow(live []candidate, conns int) {
	stalled := make(map[*Queue]time.Duration, len(live))
	for _, c := range live {
		if c.q.IsSlow() {
			stalled[c.q] = c.q.StalledFor()
		}
	}
	slices.SortFunc(live, func(x, y candidate) int {
		xs, xok := stalled[x.q]
		ys, yok := stalled[y.q]
		if xok != yok {
			if xok {
				return -1
			}
			return 1
		}
		return cmp.Or(cmp.Compare(ys, xs), cmp.Compare(y.bytes, x.bytes))
	})
	excess := int(b.slow.Load()) - b.allowedSlow(conns)
	for i := range live {
		c := &live[i]
		if excess <= 0 {
			break
		}
		if _, ok := stalled[c.q]; !ok {
			break // the slow ones come first
		}
		if c.reason == 0 {
			c.reason = ReasonSlowRatio
		}
		excess--
	}
}

// MarkEvicted records that q's connection is being evicted for a reason of
// its own, so the guards do not pick it again. It reports whether q was not
// marked before.
func (q *Queue) MarkEvicted() bool {
	if !q.evicted.CompareAndSwap(false, true) {
		return false
	}
	if q.budget != nil && q.cfg.SlowAge > 0 {
		// An evicted connection is on its way out: no longer counted slow.
		q.mu.Lock()
		q.setSlowLocked(false)
		q.mu.Unlock()
	}
	return true
}
