package limiter

// What the kernel holds for a queue's connection counts too: the bytes the
// peer has not acknowledged (SIOCOUTQ) count in the queue's bytes, so that
// the byte mark, the ceiling and status pages see the memory the
// connection really costs. The Budget's guard samples them every
// GuardInterval, never per frame; whether they move tells it whether the
// client reads (progress.go).

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

// sample takes a new sample at t: what the kernel holds unacknowledged
// (when the queue's writer took a batch since the last one, or the kernel
// still held bytes then), and whether the client made progress since
// (progress.go). It reports whether the queue is to be sampled again: the
// kernel still holds bytes, or data still waits.
func (q *Queue) sample(t int64) (again bool) {
	n, asked := int64(0), false
	if q.unsentFn != nil && (q.wroteSince.Swap(false) || q.unsent.Load() != 0) {
		n, asked = q.unsentFn(), true
	} else {
		q.wroteSince.Store(false)
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return false
	}
	progressed := q.took
	q.took = false
	if asked {
		// What the client acknowledged since the last sample: what was
		// handed to the writer since, less what the kernel holds more of.
		// A Take alone is no progress here: while the kernel's buffer has
		// room, a client that stopped reading still takes every batch.
		acked := (q.taken - q.takenSeen) - (n - q.unsent.Load())
		progressed = acked > 0
		q.takenSeen = q.taken
		q.setUnsentLocked(n)
		if q.roomWanted && q.hasRoomLocked() {
			q.signalRoom()
		}
	}
	waiting := false
	if q.cfg.SlowAge > 0 {
		waiting = q.observeLocked(t, progressed)
	}
	return waiting || q.unsent.Load() != 0
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
// guards on its own: SlowAge 0), carries the other direction of q's
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

// Streamed counts n bytes the writer copied to the socket straight from
// the other one (a spliced payload): they were never queued, yet the
// client acknowledging them is progress all the same.
func (q *Queue) Streamed(n int64) {
	q.mu.Lock()
	q.taken += n
	q.mu.Unlock()
}
