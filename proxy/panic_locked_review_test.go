package proxy

import (
	"testing"
	"time"
)

// A panic while the session's lock is held (in closeLeg, checkDoneLocked,
// doom ...) is the case recovery exists for; recovering must not need the
// lock again.
func TestReviewPanicUnderSessionLock(t *testing.T) {
	b := newEchoBackend(t)
	p := startTestProxy(t, b, Options{})
	mustUpgrade(t, p, "127.0.0.1")
	live := p.Server.liveSessions()
	if len(live) != 1 {
		t.Fatalf("%d sessions", len(live))
	}
	ss := live[0]
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer ss.recoverTimer()
		ss.mu.Lock()
		panic("injected under s.mu")
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("recovery of a panic under s.mu hangs: the goroutine waits for the lock it holds")
	}
}
