package limiter

// What the kernel holds for a queue's connection counts too: bytes the
// peer has not acknowledged (SIOCOUTQ) in the queue's bytes, and bytes
// its window holds back (SIOCOUTQNSD) in its depth, so that the byte
// mark, the slow count, the ceiling and status pages see the memory the
// connection really costs. The Budget's guard samples them every
// GuardInterval, never per frame.

// OnUnsent names the function that tells how many bytes the kernel holds
// unacknowledged for the queue's connection (Linux SIOCOUTQ), and how
// many of those it has not sent yet (SIOCOUTQNSD). The Budget's guard
// calls it each GuardInterval for queues that were written since, or
// still had bytes unsent: never per frame. Call it before the first Push.
func (q *Queue) OnUnsent(f func() (unacked, notSent int64)) {
	if q.budget != nil {
		// The guard may already see the queue: it reads unsentFn under
		// the Budget's lock.
		q.budget.mu.Lock()
		defer q.budget.mu.Unlock()
	}
	q.unsentFn = f
}

// Unsent is the last sample of what the kernel holds unacknowledged for
// the queue's connection; Bytes includes it.
func (q *Queue) Unsent() int64 { return q.unsent.Load() }

// NotSent is the part of Unsent the kernel has not sent at all, held back
// by the peer's window, as last sampled.
func (q *Queue) NotSent() int64 { return q.notSent.Load() }

// sampleUnsent takes a new sample if one is due: the queue's writer took
// a batch since the last one, or the kernel still held bytes then. It
// reports whether the kernel holds bytes still, so that the next round
// samples the queue again.
func (q *Queue) sampleUnsent() (again bool) {
	if q.unsentFn == nil || (!q.wroteSince.Swap(false) && q.unsent.Load() == 0) {
		return false
	}
	n, notSent := q.unsentFn()
	q.mu.Lock()
	if !q.closed {
		q.notSent.Store(notSent)
		q.setUnsentLocked(n)
		if q.roomWanted && q.hasRoomLocked() {
			q.signalRoom()
		}
		again = n != 0
	}
	q.mu.Unlock()
	return again
}

// setUnsentLocked replaces the unsent sample with n. Callers hold mu.
func (q *Queue) setUnsentLocked(n int64) {
	if d := n - q.unsent.Swap(n); d != 0 {
		q.addBytes(d)
		if q.budget != nil {
			q.budget.unsent.Add(d)
		}
	}
	if q.budget != nil && q.cfg.SlowDepth > 0 {
		q.updateSlow()
	}
}

// Depth is how many messages the connection is behind: those queued, and
// those the kernel holds back for want of window, counted at the average
// size of the messages written. Bytes in flight are not counted: a
// healthy client far away has many.
func (q *Queue) Depth() int {
	d := int(q.msgs.Load())
	if u, size := q.notSent.Load(), q.msgSize.Load(); u > 0 && size > 0 {
		d += int((u + size - 1) / size)
	}
	return d
}
