package limiter

import (
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// A queue idle for a long while (off the due list) gets one message; the
// guard samples it before the writer's Take. It has waited one tick, not
// an hour: it must not be slow, and Evict must not refuse at once.
func TestProgressAfterIdleIsNotStall(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := NewBudget(BudgetConfig{SlowRatio: 0.5})
		cfg := clientCfg()
		cfg.MaxMessages = 2
		cfg.EvictGrace = 500 * time.Millisecond
		q := NewQueue(cfg, b, nil)
		defer q.Close()
		clock := newGuardClock(b)
		mustPush(t, q, msg(1, 16))
		take(t, q, 1, 1<<20)
		clock.run(GuardInterval)      // sees progress, nothing waiting: off the due list
		clock.t.Add(int64(time.Hour)) // an idle hour, nobody samples
		mustPush(t, q, msg(2, 16))
		mustPush(t, q, msg(3, 16))
		clock.run(GuardInterval) // one sample before the writer ran
		if q.IsSlow() {
			t.Errorf("slow after waiting one tick; StalledFor = %v", q.StalledFor())
		}
		waitsThenGoesOn(t, q, clock)
	})
}

// waitsThenGoesOn pushes one more message onto q, full: the Push must wait
// for the client rather than refuse, and go on once the client takes.
func waitsThenGoesOn(t *testing.T, q *Queue, clock *guardClock) {
	t.Helper()
	done := asyncPush(q, msg(99, 16))
	synctest.Wait()
	clock.run(GuardInterval)
	synctest.Wait()
	if err, ok := returned(done); ok {
		t.Fatalf("Push on the full queue returned %v; want it to wait for a client that has had data for a tick or two", err)
	}
	take(t, q, 4, 1<<20) // the client reads
	synctest.Wait()
	if err, ok := returned(done); !ok || err != nil {
		t.Fatalf("after the client took: returned %v, %v; want nil", ok, err)
	}
}

// An idle client gets a burst; the writer takes and writes at once, but
// the client's acknowledgement is one RTT away when the guard samples.
// It has had data for one tick: not slow, and Evict must not refuse.
func TestProgressBurstAfterIdleUnacked(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := NewBudget(BudgetConfig{SlowRatio: 0.5})
		cfg := clientCfg()
		cfg.MaxMessages = 2
		cfg.EvictGrace = 500 * time.Millisecond
		q := NewQueue(cfg, b, nil)
		defer q.Close()
		var kernel atomic.Int64
		q.OnUnsent(kernel.Load)
		clock := newGuardClock(b)
		mustPush(t, q, msg(1, 16))
		take(t, q, 1, 1<<20)
		kernel.Store(16)
		clock.run(GuardInterval)
		kernel.Store(0)          // acknowledged
		clock.run(GuardInterval) // progress, nothing waits: off the due list
		clock.t.Add(int64(time.Hour))
		mustPush(t, q, msg(2, 16))
		take(t, q, 1, 1<<20)
		kernel.Store(16) // written, the ack one RTT away
		mustPush(t, q, msg(3, 16))
		mustPush(t, q, msg(4, 16))
		clock.run(GuardInterval)
		if q.IsSlow() {
			t.Errorf("slow one tick into a burst; StalledFor = %v", q.StalledFor())
		}
		waitsThenGoesOn(t, q, clock)
	})
}

// The writer has written all there is of a message whose rest the backend
// has not sent yet (a fragmented message, the backend pausing between
// fragments). Nothing waits for the client: it is not stalled.
func TestProgressUnfinishedMessageIsNotStall(t *testing.T) {
	b := NewBudget(BudgetConfig{SlowRatio: 0.5})
	q := NewQueue(clientCfg(), b, nil)
	defer q.Close()
	clock := newGuardClock(b)
	mustPush(t, q, dataSeg(1, 16, true, false)) // first fragment
	take(t, q, 1, 1<<20)                        // written; the client read it all
	clock.run(2 * testSlowAge)                  // the backend takes its time with the rest
	if q.IsSlow() || b.Stats().Slow != 0 {
		t.Fatalf("slow while nothing waits for the client: StalledFor %v", q.StalledFor())
	}
}
