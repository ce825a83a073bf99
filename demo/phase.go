package demo

import (
	"context"
	"net"
	"runtime/metrics"
	"time"

	"github.com/sluice-proxy/sluice/admin"
	"github.com/sluice-proxy/sluice/internal/naive"
)

// phase is one run of the same clients against a fresh naive backend:
// straight to it (the failure), or through sluice (the fix). The summary
// sets the two side by side.
type phase struct {
	viaSluice bool
	backend   *naive.Backend
	backendLn net.Listener // closed before backend.Close
	fleet     *demoFleet
	flood     *flooder // nil without -flood
	began     time.Time
	ran       time.Duration // the load, without the teardown

	// Owned by run's goroutine (watch samples them).
	peakQueued    int64  // sluice's queued bytes
	peakThrottled int    // clients sluice held back at once
	growth        growth // of the backend's queued bytes
	lastFlood     int64  // the flooder's messages at the backend, at the last screen
	lastStatus    *admin.Status
	end           naive.Stats // the backend's, at the end of the load
}

// floodAtBackend is the flooder's messages a second at the backend. Only
// the flooder sends, so the busiest connection there is its own.
func (p *phase) floodAtBackend() float64 {
	if p.flood == nil {
		return 0
	}
	return perSecond(p.end.PeakConnReceived, p.flood.ran())
}

// growth is how fast a level rose from its first sample past the first
// second to its last: the steady climb, not the start.
type growth struct {
	t0, t1 time.Duration
	v0, v1 int64
}

func (g *growth) sample(t time.Duration, v int64) {
	if t < time.Second {
		return
	}
	if g.t0 == 0 {
		g.t0, g.v0 = t, v
	}
	g.t1, g.v1 = t, v
}

// perSecond is the rise a second; 0 before two samples a second apart.
func (g growth) perSecond() float64 {
	if g.t1-g.t0 < time.Second {
		return 0
	}
	return float64(g.v1-g.v0) / (g.t1 - g.t0).Seconds()
}

// heapBytes is the Go heap of the whole demo process (backend, sluice and
// clients), in use now. runtime/metrics reads it without stopping the
// world.
func heapBytes() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return s[0].Value.Uint64()
}

// sample records what watch samples every 100 ms.
func (d *demo) sample(p *phase, now time.Time) {
	p.growth.sample(now.Sub(p.began), p.backend.Stats().QueuedBytes)
	if p.viaSluice {
		p.peakQueued = max(p.peakQueued, d.srv.Budget().Stats().QueuedBytes)
	}
}

// startLoad connects the clients (and the flooder) of p to u and starts
// the broadcast; slow clients freeze for freeze.
func (d *demo) startLoad(ctx context.Context, p *phase, u string, freeze time.Duration) {
	p.began = time.Now()
	p.fleet = newDemoFleet(u, d.opts, freeze)
	p.fleet.start(ctx)
	if d.opts.flood != 0 {
		p.flood = newFlooder(u, d.opts.flood)
		p.flood.start(ctx)
	}
	p.backend.Start()
}

// endLoad notes what the backend holds as the load ends, and stops the
// broadcast.
func (p *phase) endLoad() {
	p.ran = time.Since(p.began)
	p.end = p.backend.Stats()
	p.backend.Stop()
}

// runDirect is the first phase: the same clients straight to the naive
// backend. Slow clients stay frozen until the end, so the backend's
// queues for them only grow; nothing stands between the flooder and the
// backend. It returns after every goroutine of the phase has ended.
func (d *demo) runDirect(ctx context.Context) (*phase, error) {
	p := &phase{}
	if err := d.startBackend(p); err != nil {
		return nil, err
	}
	defer p.closeBackend()
	loadCtx, endLoad := context.WithTimeout(ctx, d.opts.duration)
	defer endLoad()
	d.startLoad(loadCtx, p, "ws://"+p.backendLn.Addr().String()+"/feed", d.opts.duration+time.Hour)
	d.watch(loadCtx, p)
	p.endLoad()
	// The naive backend has no goodbye: closing it cuts every client.
	p.fleet.wake(time.Now().Add(5 * time.Second))
	p.closeBackend()
	p.fleet.wait()
	if p.flood != nil {
		p.flood.wait()
	}
	return p, nil
}
