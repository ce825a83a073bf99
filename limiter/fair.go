package limiter

import (
	"sync/atomic"
	"time"
)

// Fair caps the total rate of client messages reaching the backend and
// shares it among the clients that want it, so one flooding client cannot
// take the share of quiet ones. It is safe for concurrent use by every
// reader, holds no per-client state and runs no goroutine.
//
// It is a GCRA calendar of send slots one interval (1/rate) apart: a
// reader books the next free slot with one compare-and-swap on the
// calendar's head and stops reading until its slot comes. Fairness comes
// from the booking order together with the read loop: a reader books one
// slot per message and books the next only after its wait, so a flooder
// holds at most one slot ahead at any time and every other waiting reader
// books in between. The slots are served round robin among the readers
// that want more than their share, and a quiet reader waits at most one
// slot per other waiting reader, far less than its share's interval:
//
//	quiet client: gets all it asks while it asks less than rate/readers
//	greedy clients: each gets rate/greedy of what the quiet ones leave
//
// A reader that books again before its previous slot has come (reading
// ahead instead of stopping) is still counted against the cap, but is not
// held to one slot per round; FairClient keeps its messages in order.
//
// Burst slots may be booked early, within the tolerance, so a backend that
// was idle gets up to burst messages at once. Time is in whole
// nanoseconds: the interval is 1e9/rate rounded to the nearest nanosecond
// (an error below 0.05% up to 1e6 messages a second; rates past 1e9
// count as 1e9).
type Fair struct {
	interval int64 // ns between slots; 0: no cap. Set once.
	tau      int64 // how early a slot may be used: (burst-1)·interval. Set once.
	_        [48]byte
	// head is the theoretical time of the next free slot: it only grows,
	// by one interval per booking.
	head atomic.Int64
	_    [56]byte
}

// FairClient is one client's part of a Fair, kept in the client's own
// struct; its zero value is ready. It is owned by the client's reader
// goroutine.
type FairClient struct {
	due int64 // the send time of the client's last booking
}

// NewFair returns a Fair that lets rate messages a second through in all;
// a rate of 0 or less means no cap, and Reserve returns after one branch.
// A burst of 0 or less means a tenth of a second's worth (at least one):
// enough to absorb readers waking together, small enough that a flooder
// arriving at an idle backend delays quiet clients by at most 100 ms.
func NewFair(rate, burst int64) *Fair {
	f := new(Fair)
	if rate <= 0 {
		return f
	}
	if burst <= 0 {
		burst = max(1, rate/10)
	}
	f.interval = max(1, (nano+rate/2)/rate)
	f.tau = (min(burst, nano) - 1) * f.interval
	return f
}

// Reserve books a slot for one of c's messages to reach the backend and
// returns how long c's reader must stop reading before forwarding it. It
// is called once per message (and per control frame the proxy forwards),
// after the client's own limit has been waited out and with a fresh now:
//
//	if d := fair.Reserve(&c.fair, limiter.Now()); d > 0 {
//		// stop reading for d, then forward the message
//	}
//
// A message's slot is never before the previous one of the same client,
// so a client's messages keep their order.
func (f *Fair) Reserve(c *FairClient, now int64) time.Duration {
	if f.interval == 0 {
		return 0
	}
	for {
		head := f.head.Load()
		next := max(head, now) + f.interval
		if !f.head.CompareAndSwap(head, next) {
			continue
		}
		// head > c.due always (head grew past c.due when c booked it), so
		// keeping c's order never leaves a slot unused.
		send := max(head-f.tau, now, c.due)
		c.due = send
		return time.Duration(send - now)
	}
}

// Interval returns the time between slots; 0 when there is no cap.
func (f *Fair) Interval() time.Duration { return time.Duration(f.interval) }
