package limiter

// What the kernel holds for a queue's connection counts too: the bytes the
// peer has not acknowledged (SIOCOUTQ) count in the queue's bytes, so that
// the byte mark, the ceiling and status pages see the memory the
// connection really costs. The Budget's guard samples them every
// GuardInterval, never per frame. They do not count toward the slow depth,
// which is in messages: counted there, what a healthy client has in flight
// or briefly pending made the slow-ratio guard evict clients that were only
// a moment behind (PERFORMANCE.md, kernel memory of stalled clients).

// OnUnsent names the function that tells how many bytes the kernel holds
// unacknowledged for the queue's connection (Linux SIOCOUTQ). The Budget's
// guard calls it each GuardInterval for queues that were written since,
// or still had bytes unsent: never per frame. Call it before the first
// Push.
func (q *Queue) OnUnsent(f func() int64) {
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

// sampleUnsent takes a new sample if one is due: the queue's writer took
// a batch since the last one, or the kernel still held bytes then. It
// reports whether the kernel holds bytes still, so that the next round
// samples the queue again.
func (q *Queue) sampleUnsent() (again bool) {
	if q.unsentFn == nil || (!q.wroteSince.Swap(false) && q.unsent.Load() == 0) {
		return false
	}
	n := q.unsentFn()
	q.mu.Lock()
	if !q.closed {
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
		switch {
		case q.budget == nil:
		case q.cfg.ToUpstream:
			q.budget.upstreamUnsent.Add(d)
		default:
			q.budget.unsent.Add(d)
		}
	}
}

// Tie records that up, a queue toward the backend (not counted by the
// guards on its own: SlowDepth 0), carries the other direction of q's
// connection. Over the ceiling the guard weighs the connection by both
// queues, so that one whose backend stopped reading is picked as surely
// as one whose client did (ReasonUpstreamCeiling).
func (q *Queue) Tie(up *Queue) { q.tied.Store(up) }

// tiedBytes is what the queue tied to q holds.
func (q *Queue) tiedBytes() int64 {
	if t := q.tied.Load(); t != nil {
		return t.Bytes()
	}
	return 0
}
