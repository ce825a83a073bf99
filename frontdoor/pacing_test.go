package frontdoor

import (
	"net/netip"
	"testing"
	"testing/synctest"
	"time"
)

// FuzzHandshakeQueue drives the pacer's queue with pushes, pops and
// removals from a few addresses and checks what a waiting client relies
// on: the bound holds, each address is served in its order of arrival,
// and no address waits behind more turns than there were other addresses
// ahead of it when it joined the round (a flood from one address cannot
// starve another).
func FuzzHandshakeQueue(f *testing.F) {
	f.Add([]byte{0, 0, 0, 1, 4, 4, 4, 4}, uint8(3))
	f.Add([]byte{0, 1, 2, 0, 0, 0, 4, 8, 4, 13, 4, 4}, uint8(8))
	f.Add([]byte{0, 0, 0, 0, 0, 0, 1, 4, 4, 2, 4, 4, 4, 4}, uint8(100))
	f.Fuzz(func(t *testing.T, ops []byte, bound uint8) {
		q := newHandshakeQueue(int(bound%16) + 1)
		type entry struct {
			w   *waiter
			seq int
		}
		var waiting []entry             // in push order
		lastSeq := map[netip.Addr]int{} // the latest seq popped per address
		budget := map[netip.Addr]int{}  // pops of others allowed before this address's next
		seqOf := map[*waiter]int{}
		distinctWaiting := func(except netip.Addr) int {
			seen := map[netip.Addr]bool{}
			for _, e := range waiting {
				if e.w.key != except {
					seen[e.w.key] = true
				}
			}
			return len(seen)
		}
		has := func(k netip.Addr) bool {
			for _, e := range waiting {
				if e.w.key == k {
					return true
				}
			}
			return false
		}
		seq := 0
		for _, op := range ops {
			switch op % 4 {
			case 0, 1: // push from one of four addresses
				key := netip.AddrFrom4([4]byte{127, 0, 0, op>>2%4 + 1})
				w := &waiter{key: key}
				joins := !has(key)
				full := q.len() >= q.bound
				if ok := q.push(w); ok == full {
					t.Fatalf("push with %d of %d queued: %v", q.len(), q.bound, ok)
				}
				if full {
					continue
				}
				seq++
				seqOf[w] = seq
				waiting = append(waiting, entry{w, seq})
				if joins {
					budget[key] = distinctWaiting(key)
				}
			case 2: // pop
				w := q.pop()
				if len(waiting) == 0 {
					if w != nil {
						t.Fatal("pop from an empty queue returned a waiter")
					}
					continue
				}
				if w == nil {
					t.Fatalf("pop returned nil with %d waiting", len(waiting))
				}
				if s := seqOf[w]; s < lastSeq[w.key] {
					t.Fatalf("address %v served %d after %d", w.key, s, lastSeq[w.key])
				}
				lastSeq[w.key] = seqOf[w]
				for i, e := range waiting {
					if e.w == w {
						waiting = append(waiting[:i], waiting[i+1:]...)
						break
					}
				}
				for k := range budget {
					if k == w.key {
						continue
					}
					if budget[k]--; budget[k] < 0 {
						t.Fatalf("address %v waited behind more turns than addresses ahead of it", k)
					}
				}
				delete(budget, w.key)
				if has(w.key) {
					budget[w.key] = distinctWaiting(w.key)
				}
			case 3: // a waiter times out
				if len(waiting) == 0 {
					continue
				}
				i := int(op>>2) % len(waiting)
				w := waiting[i].w
				if !q.remove(w) {
					t.Fatal("remove lost a queued waiter")
				}
				if q.remove(w) {
					t.Fatal("removed a waiter twice")
				}
				waiting = append(waiting[:i], waiting[i+1:]...)
				if !has(w.key) {
					delete(budget, w.key)
				}
			}
			if q.len() != len(waiting) {
				t.Fatalf("len %d, want %d", q.len(), len(waiting))
			}
		}
	})
}

// TestPacerSpacesTurns checks the rate's burst of one on a fake clock:
// ten upgrades at once at 100/s start 10 ms apart, never two together.
func TestPacerSpacesTurns(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := NewPacer(PacingConfig{HandshakesPerSecond: 100, QueueTimeout: time.Minute}, NewPacingMetrics(nil))
		began := time.Now()
		starts := make(chan time.Duration, 10)
		for i := range 10 {
			go func() {
				if _, err := p.wait(netip.AddrFrom4([4]byte{127, 0, 0, byte(i + 1)})); err != nil {
					t.Error(err)
					return
				}
				starts <- time.Since(began)
				p.finish()
			}()
		}
		seen := make([]time.Duration, 0, 10)
		for range 10 {
			seen = append(seen, <-starts)
		}
		for i, d := range seen {
			if want := time.Duration(i) * 10 * time.Millisecond; d != want {
				t.Fatalf("start %d at %v, want %v (all: %v)", i, d, want, seen)
			}
		}
	})
}

// TestPacerTimeoutAndClose checks the two ends of a wait that gets no
// turn: the timeout, and a shutdown that refuses the queue at once.
func TestPacerTimeoutAndClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := NewPacer(PacingConfig{MaxHandshakes: 1, QueueTimeout: time.Second}, NewPacingMetrics(nil))
		key := netip.AddrFrom4([4]byte{127, 0, 0, 1})
		if queued, err := p.wait(key); err != nil || queued {
			t.Fatalf("first wait: queued %v, %v; want a turn at once", queued, err)
		}
		began := time.Now()
		if _, err := p.wait(key); err != errPacingTimeout || time.Since(began) != time.Second {
			t.Fatalf("second wait: %v after %v, want a timeout after 1s", err, time.Since(began))
		}
		errs := make(chan error)
		go func() { _, err := p.wait(key); errs <- err }()
		synctest.Wait()
		if _, q := p.Counts(); q != 1 {
			t.Fatalf("%d queued, want 1", q)
		}
		p.Close()
		if err := <-errs; err != errPacingDraining || time.Since(began) != time.Second {
			t.Fatalf("queued wait at close: %v after %v, want draining at once", err, time.Since(began))
		}
		p.finish()
	})
}
