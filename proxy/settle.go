package proxy

import (
	"runtime/debug"
	"sync/atomic"
	"time"
)

// setupGC hands the garbage of a burst of session setups back to the
// operating system once the burst is over.
//
// A handshake leaves garbage behind (request parsing, the upstream dial,
// the answer) and the collector runs only when the heap reaches its goal,
// twice what was live at the last collection; an idle proxy allocates
// next to nothing, so after a burst of connections it may not collect
// again for the two minutes of Go's forced cycle, and even then the
// scavenger keeps the freed pages up to that goal. Measured at 9,500
// idle connections: about 0.5 KiB of RSS per connection that no
// connection uses.
//
// So once setups stop for quietFor, and enough of them happened since
// the last time to be worth a whole collection (a quarter of the sessions
// now open, at least minBurst), one collection runs and returns the free
// pages (debug.FreeOSMemory). It never runs during a burst, nor during
// steady churn (whose garbage the next setups reuse), nor more than once
// per quarter of the sessions set up: a collection marks the live heap
// (a few KiB per session), so it costs each setup of the burst about
// four sessions' worth of marking at most.
type setupGC struct {
	quietFor time.Duration
	minBurst int64
	sessions func() int // sessions open now
	collect  func()     // debug.FreeOSMemory; tests count calls instead

	setups  atomic.Int64 // sessions set up since the server started
	armed   atomic.Bool  // the timer is set, or its callback runs
	stopped atomic.Bool  // Shutdown: the timer is not set again
	timer   *time.Timer

	// Owned by the timer callback (one runs at a time: it is only set
	// again by the callback itself, or once armed is false).
	seen      int64 // setups at the last look
	collected int64 // setups at the last collection
}

// Defaults of setupGC.
const (
	setupQuiet    = time.Second
	setupMinBurst = 256
)

func newSetupGC(sessions func() int) *setupGC {
	g := &setupGC{quietFor: setupQuiet, minBurst: setupMinBurst, sessions: sessions, collect: debug.FreeOSMemory}
	g.timer = time.AfterFunc(time.Duration(1<<63-1), g.look)
	g.timer.Stop()
	return g
}

// setUp counts a new session; a burst's first one sets the timer.
func (g *setupGC) setUp() {
	g.setups.Add(1)
	g.arm()
}

// arm sets the timer unless it is set or stopped.
func (g *setupGC) arm() {
	if !g.armed.Load() && g.armed.CompareAndSwap(false, true) {
		if g.stopped.Load() {
			return // stays armed: nothing sets it again
		}
		g.timer.Reset(g.quietFor)
	}
}

// look runs quietFor after the timer was set: it waits on while sessions
// are still being set up, and collects once they have stopped.
func (g *setupGC) look() {
	n := g.setups.Load()
	if g.stopped.Load() {
		return // stays armed
	}
	if n != g.seen {
		g.seen = n
		g.timer.Reset(g.quietFor) // the burst goes on
		return
	}
	if n-g.collected >= max(g.minBurst, int64(g.sessions()/4)) {
		g.collected = n
		g.collect()
	}
	g.armed.Store(false)
	// A setup that came after the load above saw armed set and left the
	// timer alone: look again for it.
	if g.setups.Load() != n {
		g.arm()
	}
}

// stop ends the watch for good; Shutdown calls it. A look already under
// way may still finish.
func (g *setupGC) stop() {
	g.stopped.Store(true)
	g.timer.Stop()
}
