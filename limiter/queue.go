package limiter

import (
	"sync"
	"sync/atomic"
	"time"
)

// Config bounds one Queue. It is shared by every queue of a kind and must
// not change after the first queue is made.
type Config struct {
	Policy Policy
	// MaxMessages and MaxBytes are the high-water mark: a new message that
	// finds the queue at either is handled by the Policy.
	MaxMessages int
	MaxBytes    int64
	// LowWater is the fraction of both marks below which a paused producer
	// resumes (0 < LowWater < 1).
	LowWater float64
	// KeepNewest is how many queued messages the Drop policy keeps,
	// counting the new one.
	KeepNewest int
	// PauseMax bounds one pause of the producer (Pause, and Evict waiting
	// for a client that still takes bytes); 0 means no bound.
	PauseMax time.Duration
	// EvictGrace is how long the client may take nothing while the queue
	// is at its high-water mark before the Evict policy refuses a message.
	// A client that takes bytes, however busy the machine, is not evicted
	// for a full queue: the producer waits for it instead, as under Pause,
	// until it stalls (nothing taken for EvictGrace) or the wait passes
	// PauseMax. 0 refuses at once, whatever the client is doing.
	EvictGrace time.Duration
	// SlowAge is how long a client may take nothing while data waits for
	// it before it counts as slow (progress.go). A queue deep while bytes
	// flow is not slow. 0 means the queue is never slow and not counted by
	// the Budget's guards (the upstream direction).
	SlowAge time.Duration
	// ToUpstream says the queue feeds a backend: what the kernel holds
	// unsent for it counts as Stats.UpstreamUnsentBytes, not UnsentBytes.
	ToUpstream bool
}

func (c *Config) lowMessages() int { return int(float64(c.MaxMessages) * c.LowWater) }

func (c *Config) lowBytes() int64 { return int64(float64(c.MaxBytes) * c.LowWater) }

// over reports whether a segment of n bytes finds the queue at its
// high-water mark. Only a segment that starts a message counts against
// MaxMessages: the rest of a message adds no message, and the message it
// belongs to is already counted, so it must not wait for the count to fall.
func (c *Config) over(start bool, msgs int, bytes, n int64) bool {
	return (start && msgs >= c.MaxMessages) || (bytes > 0 && bytes+n > c.MaxBytes)
}

// ctlSlots bounds the priority lane: a producer that forwards a peer's
// ping or pong waits for room (TCP backpressure toward that peer) rather
// than drop it. sluice's own keepalive ping takes one slot more, so it is
// never refused for want of room, and is coalesced: while one waits
// unwritten, the next is not queued.
const ctlSlots = 16

var epoch = time.Now()

// now is monotonic nanoseconds since the process started.
func now() int64 { return int64(time.Since(epoch)) }

// Queue holds the frames waiting for one socket's writer. One producer
// pushes data, anyone may push control frames, one writer takes.
type Queue struct {
	cfg    *Config
	budget *Budget // nil: not counted

	// Readable without mu, for guards and status pages; written under mu.
	bytes     atomic.Int64
	msgs      atomic.Int32
	evicted   atomic.Bool
	reclaimed atomic.Bool // the Budget asked for an evicted connection's memory back

	mu           sync.Mutex
	head, tail   *Segment // data lane, oldest first
	ctlHead      *Segment // priority lane, oldest first
	ctlTail      *Segment
	nctl         int
	ownPing      bool     // one of ctl is sluice's own ping
	closeFrame   *Segment // sent after data, or first when closeFirst
	closeFirst   bool
	closed       bool  // aborted: Take and Push fail
	writerInMsg  bool  // the writer has taken a message's start but not its end
	roomWanted   bool  // the producer waits on room
	roomForStart bool  // ... to start a message: the count must fall too
	pausedAt     int64 // monotonic ns the current pause began; 0 if none
	pauseEnded   int64 // monotonic ns the last pause ended; 0 if none
	dropped      uint64

	// Progress (progress.go): whether the client is taking what waits.
	took           bool        // Take handed the writer something since the last sample
	taken          int64       // bytes handed to the writer or streamed, ever (Take, Streamed)
	takenSeen      int64       // taken as of the last sample of the kernel's share
	sampledAt      int64       // monotonic ns of the guard's last sample of this queue; 0 before it
	progressAt     int64       // monotonic ns of the last sample that saw progress, or nothing waiting
	waitedAtSample bool        // the last sample saw something waiting for the client
	slow           atomic.Bool // counted slow by the Budget; written under mu

	// room tells the producer waiting on the data lane that it is below
	// low water, or closed; ctlRoom tells a forwarder waiting on a full
	// priority lane. Each is made by its first waiter, under mu: most
	// connections never wait.
	room    chan struct{}
	ctlRoom chan struct{}

	// unsent is what the kernel holds of this queue's connection that the
	// peer has not acknowledged (SIOCOUTQ), as last sampled; it counts in
	// bytes, so the byte mark, the ceiling and status pages see it.
	unsent     atomic.Int64
	unsentFn   func() int64 // see OnUnsent; set under budget.mu
	wroteSince atomic.Bool  // a batch was taken since the last sample
	due        atomic.Bool  // on the Budget's list to sample (markDue)

	onEvict func(Reason) // called by the Budget's guard, outside any lock

	// tied is the queue toward the same connection's backend (Tie): the
	// ceiling guard weighs the connection by both.
	tied atomic.Pointer[Queue]
}

// Pending reports whether the queue holds anything for a writer to take.
// A writer that got ErrIdle checks it after it has said it stopped, so
// that what was queued meanwhile is not left without a writer (the
// session's writer loop).
func (q *Queue) Pending() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return !q.closed && (q.nctl > 0 || q.head != nil || q.closeFrame != nil)
}

// Expedite discards the data lane so that a queued close frame leaves at
// once.
func (q *Queue) Expedite() {
	q.mu.Lock()
	q.discardLocked()
	q.closeFirst = true
	q.signalRoom()
	q.mu.Unlock()
}

// NewQueue makes a queue bounded by cfg and counted in b (if not nil).
// onEvict is how the Budget's guard asks the queue's connection to go.
func NewQueue(cfg *Config, b *Budget, onEvict func(Reason)) *Queue {
	q := &Queue{
		cfg:     cfg,
		budget:  b,
		onEvict: onEvict,
	}
	if b != nil && cfg.SlowAge > 0 {
		b.register(q)
	}
	return q
}

// Bytes is the number of bytes queued.
func (q *Queue) Bytes() int64 { return q.bytes.Load() }

// Messages is the number of data messages not yet fully written.
func (q *Queue) Messages() int { return int(q.msgs.Load()) }

// Dropped is the number of messages the Drop policy discarded.
func (q *Queue) Dropped() uint64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.dropped
}

// Paused reports whether the producer is paused, and since when.
func (q *Queue) Paused() (bool, time.Duration) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.pausedAt == 0 {
		return false, 0
	}
	return true, time.Duration(now() - q.pausedAt)
}

// Push appends a data segment. It returns ErrOverflow when the Evict policy
// refuses a new message, ErrPauseTimeout when a pause outlasts PauseMax,
// and ErrClosed when the queue is closed or a close frame is queued; on any
// error the caller still owns seg. It blocks while the queue has no room
// (the Pause policy, or the rest of a message that has already started).
func (q *Queue) Push(seg *Segment) error {
	n := seg.Len()
	var pauseTimer, graceTimer *time.Timer
	graceOver := false
	defer func() {
		if pauseTimer != nil {
			pauseTimer.Stop()
		}
		if graceTimer != nil {
			graceTimer.Stop()
		}
	}()
	q.mu.Lock()
	for {
		if q.closed || q.closeFrame != nil {
			q.endPause()
			q.mu.Unlock()
			return ErrClosed
		}
		msgs, bytes := int(q.msgs.Load()), q.bytes.Load()
		if !q.cfg.over(seg.Start, msgs, bytes, n) {
			break
		}
		if seg.Start {
			switch q.cfg.Policy {
			case Evict:
				if q.cfg.EvictGrace <= 0 || graceOver || q.stalledLocked() {
					q.roomWanted = false
					q.endPause()
					q.mu.Unlock()
					return ErrOverflow
				}
				if graceTimer == nil && q.cfg.SlowAge == 0 {
					// Nobody samples this queue's progress: the grace runs
					// from the overflow, once.
					graceTimer = time.NewTimer(q.cfg.EvictGrace)
				}
			case Drop:
				if q.dropOldest(n) {
					continue
				}
			}
		}
		// Wait for the writer to drain below the low-water mark.
		if q.pausedAt == 0 && graceTimer == nil {
			q.pausedAt = now()
			if q.budget != nil {
				q.budget.paused.Add(1)
			}
			if q.cfg.PauseMax > 0 && seg.Start && (q.cfg.Policy == Pause || q.cfg.Policy == Evict) {
				pauseTimer = time.NewTimer(q.cfg.PauseMax)
			}
		}
		q.roomWanted, q.roomForStart = true, seg.Start
		if q.room == nil {
			q.room = make(chan struct{}, 1)
		}
		room := q.room
		q.mu.Unlock()
		var expired, grace <-chan time.Time
		if pauseTimer != nil {
			expired = pauseTimer.C
		}
		if graceTimer != nil {
			grace = graceTimer.C
		}
		select {
		case <-room:
		case <-grace:
			graceOver = true // the loop refuses the message unless there is room now
		case <-expired:
			q.mu.Lock()
			q.roomWanted = false
			q.endPause()
			q.mu.Unlock()
			return ErrPauseTimeout
		}
		q.mu.Lock()
	}
	q.endPause()
	if seg.Start && q.budget != nil && q.budget.cfg.ObserveWait != nil {
		seg.queuedAt = q.budget.clock() // only a message's first segment is observed
	}
	if q.tail == nil {
		q.head = seg
		if q.cfg.SlowAge > 0 && q.budget != nil && !q.wroteSince.Load() && !q.wroteSince.Swap(true) {
			// Data waits from now: the guard watches whether the client
			// takes it, even while its writer is blocked and takes nothing.
			q.budget.markDue(q)
		}
	} else {
		q.tail.next = seg
	}
	q.tail = seg
	q.addBytes(n)
	if seg.Start {
		q.addMessages(1)
	}
	q.mu.Unlock()
	return nil
}

// endPause ends a pause, if one is on. Callers hold mu.
func (q *Queue) endPause() {
	if q.pausedAt == 0 {
		return
	}
	t := now()
	if q.budget != nil {
		q.budget.paused.Add(-1)
		q.budget.pauseNanos.Add(t - q.pausedAt)
	}
	q.pausedAt, q.pauseEnded = 0, t
}

// PausedWithin reports whether the producer is paused, or was within d.
func (q *Queue) PausedWithin(d time.Duration) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.pausedAt != 0 || q.pauseEnded != 0 && now()-q.pauseEnded < int64(d)
}

// dropOldest discards the oldest whole messages that the writer has not
// started, so that the newest KeepNewest fit with the new one of n bytes.
// It reports whether there is room now. Callers hold mu.
func (q *Queue) dropOldest(n int64) bool {
	var prev *Segment // last segment kept before the cut
	cur := q.head
	if q.writerInMsg {
		// The message being written stays whole.
		for cur != nil && !cur.End {
			prev, cur = cur, cur.next
		}
		if cur != nil {
			prev, cur = cur, cur.next
		}
	}
	// Keep the newest KeepNewest-1 whole messages besides the new one; the
	// message being written does not take one of their places.
	keep := q.cfg.KeepNewest - 1
	if q.writerInMsg {
		keep++
	}
	for cur != nil && cur.Start && (int(q.msgs.Load()) > keep || q.cfg.over(true, int(q.msgs.Load()), q.bytes.Load(), n)) {
		// Find the end of this message; it is complete, since the producer
		// is starting a new one.
		for {
			next := cur.next
			end := cur.End
			q.freeUnwritten(cur)
			cur = next
			if end {
				break
			}
		}
		q.addMessages(-1)
		q.dropped++
		if q.budget != nil {
			q.budget.dropped.Add(1)
		}
	}
	if prev == nil {
		q.head = cur
	} else {
		prev.next = cur
	}
	if cur == nil {
		q.tail = prev
	}
	return !q.cfg.over(true, int(q.msgs.Load()), q.bytes.Load(), n)
}

// PushControl queues a ping or pong that a peer sent, on the priority
// lane. It waits while the lane is full, and returns ErrClosed, leaving seg
// with the caller, once the queue is closed or a close frame is queued:
// nothing may follow a close.
func (q *Queue) PushControl(seg *Segment) error {
	q.mu.Lock()
	for {
		if q.closed || q.closeFrame != nil {
			q.mu.Unlock()
			return ErrClosed
		}
		if q.nctl-b2i(q.ownPing) < ctlSlots {
			break
		}
		if q.ctlRoom == nil {
			q.ctlRoom = make(chan struct{}, 1)
		}
		room := q.ctlRoom
		q.mu.Unlock()
		<-room
		q.mu.Lock()
	}
	q.appendControl(seg)
	q.mu.Unlock()
	return nil
}

// PushPing queues a ping sluice makes itself. It never waits: it reports
// false, leaving seg with the caller, when the queue is closing or the
// previous own ping is still unwritten (a peer needs only one to answer).
func (q *Queue) PushPing(seg *Segment) bool {
	q.mu.Lock()
	if q.closed || q.closeFrame != nil || q.ownPing {
		q.mu.Unlock()
		return false
	}
	q.ownPing = true
	q.appendControl(seg)
	q.mu.Unlock()
	return true
}

// appendControl puts seg on the priority lane. Callers hold mu and have
// made sure it has room.
func (q *Queue) appendControl(seg *Segment) {
	seg.Control = true
	seg.next = nil
	if q.ctlTail == nil {
		q.ctlHead = seg
	} else {
		q.ctlTail.next = seg
	}
	q.ctlTail = seg
	q.nctl++
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// PushClose queues a close frame, after the queued data or, with first set,
// ahead of it, discarding the data. Once a close is queued no later one is
// taken: it reports false and the caller still owns seg. A later call with
// first set still discards the data, so the queued close leaves at once.
func (q *Queue) PushClose(seg *Segment, first bool) bool {
	q.mu.Lock()
	if first {
		q.discardLocked()
		q.closeFirst = true
	}
	if q.closed || q.closeFrame != nil {
		q.mu.Unlock()
		return false
	}
	seg.Control, seg.Close = true, true
	q.closeFrame = seg
	q.signalRoom()
	q.signalCtlRoom()
	q.mu.Unlock()
	return true
}

// discardLocked drops the data lane. The message the writer has started
// loses its tail; that is only done when the connection is closing anyway.
func (q *Queue) discardLocked() {
	for s := q.head; s != nil; {
		next := s.next
		q.freeUnwritten(s)
		s = next
	}
	q.head, q.tail = nil, nil
	q.addMessages(-int(q.msgs.Load()))
}

// freeUnwritten frees a data segment taken out of the lane unwritten, and
// tells the producer when it was a streamed frame's, so that it skips the
// payload. Callers hold mu.
func (q *Queue) freeUnwritten(s *Segment) {
	q.addBytes(-s.Len())
	if s.Follow > 0 && s.Discarded != nil {
		select {
		case s.Discarded <- ErrClosed:
		default:
		}
	}
	s.Free()
}

// Take appends to dst what the writer should write next: control frames
// first, then data up to maxBytes and cap(dst) and, once the data lane is
// empty, a queued close frame. It always returns at least one segment, even
// past maxBytes or cap(dst). A segment with Follow or Close ends the batch.
// It never blocks: with nothing queued it returns ErrIdle and the writer
// should end (whoever pushes next starts another; see Pending); once the
// queue is closed it returns ErrClosed.
func (q *Queue) Take(dst []*Segment, maxBytes int64) ([]*Segment, error) {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return dst, ErrClosed
	}
	if q.nctl == 0 && q.head == nil && q.closeFrame == nil {
		q.mu.Unlock()
		return dst, ErrIdle
	}
	for s := q.ctlHead; s != nil; {
		next := s.next
		s.next = nil
		dst = append(dst, s)
		s = next
	}
	if q.nctl > 0 {
		q.ctlHead, q.ctlTail = nil, nil
		q.nctl, q.ownPing = 0, false
		q.signalCtlRoom()
	}
	q.took = true
	if !q.wroteSince.Swap(true) && q.budget != nil && (q.unsentFn != nil || q.cfg.SlowAge > 0) {
		q.budget.markDue(q) // the first write since the last sample
	}
	if q.closeFrame != nil && q.closeFirst {
		dst = append(dst, q.closeFrame)
		q.closeFrame = nil
		q.closed = true
		q.mu.Unlock()
		return dst, nil
	}
	first := len(dst) // nothing is taken while len(dst) == first
	var taken int64
	var ended int
	var lastWait int64
	for q.head != nil && (len(dst) < cap(dst) || len(dst) == first) && (taken == 0 || taken+q.head.Len() <= maxBytes) {
		s := q.head
		q.head = s.next
		if q.head == nil {
			q.tail = nil
		}
		s.next = nil
		taken += s.Len()
		if s.Start {
			lastWait = s.queuedAt
		}
		if s.End {
			ended++
		}
		q.writerInMsg = !s.End
		dst = append(dst, s)
		if s.Follow > 0 {
			break
		}
	}
	// The counters are settled once per batch: the budget's are shared by
	// every connection, so an atomic add per segment would contend.
	if taken != 0 {
		q.taken += taken
		q.addBytes(-taken)
	}
	if ended != 0 {
		q.addMessages(-ended)
	}
	if q.head == nil && q.closeFrame != nil && (len(dst) < cap(dst) || len(dst) == first) && (len(dst) == first || dst[len(dst)-1].Follow == 0) {
		dst = append(dst, q.closeFrame)
		q.closeFrame = nil
		q.closed = true
	}
	if q.roomWanted && q.hasRoomLocked() {
		q.signalRoom()
	}
	q.mu.Unlock()
	if lastWait != 0 && q.budget != nil && q.budget.cfg.ObserveWait != nil {
		q.budget.cfg.ObserveWait(time.Duration(q.budget.clock() - lastWait))
	}
	return dst, nil
}

// Close aborts the queue: data and control frames are freed, a blocked
// Push or Take returns ErrClosed. Idempotent.
func (q *Queue) Close() {
	q.mu.Lock()
	q.discardLocked()
	for s := q.ctlHead; s != nil; {
		next := s.next
		s.Free()
		s = next
	}
	q.ctlHead, q.ctlTail = nil, nil
	q.nctl, q.ownPing = 0, false
	if q.closeFrame != nil {
		q.closeFrame.Free()
		q.closeFrame = nil
	}
	q.closed = true
	q.endPause()
	q.setUnsentLocked(0)
	q.setSlowLocked(false)
	q.signalRoom()
	q.signalCtlRoom()
	q.mu.Unlock()
	if q.budget != nil && q.cfg.SlowAge > 0 {
		q.budget.unregister(q)
	}
}

func (q *Queue) signalRoom() {
	q.roomWanted = false
	if q.room == nil {
		return
	}
	select {
	case q.room <- struct{}{}:
	default:
	}
}

func (q *Queue) signalCtlRoom() {
	if q.ctlRoom == nil {
		return
	}
	select {
	case q.ctlRoom <- struct{}{}:
	default:
	}
}

// hasRoomLocked: a waiting producer may go on. Callers hold mu.
func (q *Queue) hasRoomLocked() bool {
	return q.bytes.Load() <= q.cfg.lowBytes() && (!q.roomForStart || int(q.msgs.Load()) <= q.cfg.lowMessages())
}

// addBytes and addMessages keep the queue's and the budget's counters in
// step. Callers hold mu.
func (q *Queue) addBytes(n int64) {
	q.bytes.Add(n)
	if q.budget != nil {
		q.budget.queued.Add(n)
	}
}

func (q *Queue) addMessages(n int) {
	q.msgs.Add(int32(n))
}
