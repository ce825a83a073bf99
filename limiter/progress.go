package limiter

import "time"

// Slow means stalled. A client counts as slow when it has stopped taking
// what waits for it, not when its queue is deep for a moment: its socket
// has taken nothing for SlowAge while data waited. On a busy machine a
// client that reads as fast as it can may have dozens of messages queued,
// some of them for seconds when the whole pod is saturated; it still takes
// bytes, so it is not slow, and neither the ratio guard nor the Evict
// policy disconnects it. nats-server draws the same line: a client is slow
// when a flush to it has blocked past its write deadline, not when a burst
// is pending. A client that takes bytes but ever fewer than it is sent is
// bounded otherwise: its writer must finish each batch within the write
// deadline, drop sheds its backlog, and a producer held back for PauseMax
// (pause, or evict at the high-water mark) ends the session.
//
// Progress is seen by the Budget's guard, every GuardInterval, for the
// queues on its due list (written since the last sample, or with anything
// waiting): the client acknowledged bytes since the last sample, that is,
// more was handed to the writer than the kernel now holds in addition
// (SIOCOUTQ). A Take alone is not enough: a client that stopped reading
// still takes batch after batch while the kernel's send buffer fills
// (hundreds of KiB, seconds of a feed), and a stalled client's unsent bytes
// then sit still to the byte. Where the kernel cannot be asked, a batch
// taken since the last sample counts. Nothing is timed on the frame path.

// waitingLocked: something waits for the client, in the queue or in the
// kernel. Callers hold mu.
func (q *Queue) waitingLocked() bool {
	// Not the message count: the writer may have written all of a message
	// whose rest the backend has yet to send, and nothing then waits for
	// the client.
	return q.head != nil || q.nctl > 0 || q.unsent.Load() > 0
}

// observeLocked records one sample's verdict at t: progressed says the
// client took something since the last sample. It updates the slow count
// and reports whether the queue still has something waiting, so that the
// guard samples it again. Callers hold mu.
func (q *Queue) observeLocked(t int64, progressed bool) (waiting bool) {
	waiting = !q.closed && q.waitingLocked()
	if progressed || !waiting || !q.waitedAtSample {
		// A wait is timed from the first sample that sees it: data that
		// came after an idle spell, the queue off the guard's list, has
		// waited one interval at most, not since the sample before it.
		q.progressAt = t
	}
	q.sampledAt, q.waitedAtSample = t, waiting
	q.setSlowLocked(waiting && q.stillFor() >= q.cfg.SlowAge)
	if q.roomWanted && q.cfg.Policy == Evict {
		q.signalRoom() // the producer at the high-water mark looks again
	}
	return waiting
}

// stillFor is how long, by the samples, the client has taken nothing: the
// stillness is measured between samples, so a guard that ran late (a busy
// machine) does not make every client look stalled. Where the kernel
// cannot be asked, 0 while the writer has taken something since the last
// sample. Callers hold mu.
func (q *Queue) stillFor() time.Duration {
	if q.sampledAt == 0 || (q.took && q.unsentFn == nil) {
		return 0
	}
	return time.Duration(q.sampledAt - q.progressAt)
}

// stalledLocked is the Evict policy's test at the high-water mark: the
// client has taken nothing for EvictGrace. Callers hold mu.
func (q *Queue) stalledLocked() bool {
	return q.cfg.SlowAge > 0 && q.budget != nil && q.stillFor() >= q.cfg.EvictGrace
}

// setSlowLocked keeps the Budget's count of slow queues in step. A queue
// being evicted is not counted. Callers hold mu.
func (q *Queue) setSlowLocked(slow bool) {
	slow = slow && !q.evicted.Load() && !q.closed
	if q.slow.Load() == slow {
		return
	}
	q.slow.Store(slow)
	if q.budget == nil {
		return
	}
	if slow {
		q.budget.slow.Add(1)
	} else {
		q.budget.slow.Add(-1)
	}
}

// IsSlow reports whether the queue counts as slow now.
func (q *Queue) IsSlow() bool { return q.slow.Load() }

// StalledFor is how long, by the guard's samples, the client has taken
// nothing while data waited for it; 0 when it is keeping up.
func (q *Queue) StalledFor() time.Duration {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.waitingLocked() {
		return 0
	}
	return q.stillFor()
}
