package main

import (
	"context"
	"net"
	"net/http"
	"net/http/pprof"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"sluice/limiter"
	"sluice/proxy"
)

// readyWindow is how recent a successful upstream connect must be for
// /readyz to answer without probing the upstream itself.
const readyWindow = 10 * time.Second

// adminHandler serves the operator's endpoints on the admin listener;
// status, if not nil, adds the live status page, and withPprof Go's
// profiles (SLUICE_PPROF).
func adminHandler(srv *proxy.Server, reg *prometheus.Registry, upstreamAddr string, status *statusPage, withPprof bool) http.Handler {
	mux := http.NewServeMux()
	if status != nil {
		mux.HandleFunc("GET /status", status.servePage)
		mux.HandleFunc("GET /status.json", status.serveJSON)
	}
	if withPprof {
		registerPprof(mux)
	}
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok\n"))
	})
	probe := &upstreamProbe{addr: upstreamAddr, srv: srv}
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if srv.Draining() {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		if err := probe.check(r.Context()); err != nil {
			http.Error(w, "upstream unreachable: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	return mux
}

// registerPprof serves net/http/pprof's handlers under /debug/pprof/ on
// mux. They are named here rather than left to the package's init, which
// puts them on http.DefaultServeMux: nothing in sluice serves that mux, so
// the profiles are only ever on the admin listener, and only when asked
// for. Index serves every named profile (heap, goroutine, allocs, …) under
// /debug/pprof/NAME.
func registerPprof(mux *http.ServeMux) {
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
}

// upstreamProbe answers "did the upstream accept a TCP connection
// recently?", dialling it itself at most once per readyWindow when no
// session did.
type upstreamProbe struct {
	addr string
	srv  *proxy.Server

	mu       sync.Mutex
	lastOK   time.Time // guarded by mu
	lastFail error     // guarded by mu
	lastTry  time.Time // guarded by mu
}

func (p *upstreamProbe) check(ctx context.Context) error {
	if time.Since(p.srv.LastUpstreamConnect()) < readyWindow {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if time.Since(p.lastOK) < readyWindow {
		return nil
	}
	if time.Since(p.lastTry) < time.Second && p.lastFail != nil {
		return p.lastFail
	}
	p.lastTry = time.Now()
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", p.addr)
	if err != nil {
		p.lastFail = err
		return err
	}
	c.Close()
	p.lastOK, p.lastFail = time.Now(), nil
	return nil
}

// registerBudgetMetrics exports the limiter's counters, read at scrape
// time so the frame path pays nothing for them.
func registerBudgetMetrics(reg prometheus.Registerer, srv *proxy.Server) {
	b := srv.Budget()
	gauge := func(name, help string, f func(limiter.Stats) float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 { return f(b.Stats()) })
	}
	reg.MustRegister(
		gauge("sluice_queued_bytes", "Bytes waiting in all client queues.", func(s limiter.Stats) float64 { return float64(s.QueuedBytes) }),
		gauge("sluice_queue_ceiling_bytes", "The global ceiling on queued bytes (0: none).", func(s limiter.Stats) float64 { return float64(s.Ceiling) }),
		gauge("sluice_queued_bytes_ratio", "Queued bytes as a share of the ceiling.", func(s limiter.Stats) float64 {
			if s.Ceiling == 0 {
				return 0
			}
			return float64(s.QueuedBytes) / float64(s.Ceiling)
		}),
		gauge("sluice_slow_clients", "Clients whose queue is at or past the slow depth.", func(s limiter.Stats) float64 { return float64(s.Slow) }),
		gauge("sluice_paused_connections", "Upstream readers paused until their client's queue drains.", func(s limiter.Stats) float64 { return float64(s.Paused) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "sluice_dropped_messages_total", Help: "Messages discarded by the drop policy."},
			func() float64 { return float64(b.Stats().DroppedTotal) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "sluice_pause_seconds_total", Help: "Time upstream readers spent paused, ended pauses."},
			func() float64 { return b.Stats().PausedTime.Seconds() }),
		&depthCollector{budget: b, desc: prometheus.NewDesc("sluice_queue_depth_messages",
			"Client queue depths in messages, sampled over all connections at scrape time.", nil, nil)},
	)
}

// depthCollector builds the queue depth histogram at scrape time from every
// queue, so p95/p99 depth can be read without a per-message cost.
type depthCollector struct {
	budget *limiter.Budget
	desc   *prometheus.Desc
}

var depthBuckets = []float64{0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000}

func (c *depthCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *depthCollector) Collect(ch chan<- prometheus.Metric) {
	counts := make([]uint64, len(depthBuckets))
	var n uint64
	var sum float64
	c.budget.Each(func(q *limiter.Queue) {
		d := float64(q.Messages())
		n++
		sum += d
		for i, ub := range depthBuckets {
			if d <= ub {
				counts[i]++
			}
		}
	})
	buckets := make(map[float64]uint64, len(depthBuckets))
	for i, ub := range depthBuckets {
		buckets[ub] = counts[i]
	}
	ch <- prometheus.MustNewConstHistogram(c.desc, n, sum, buckets)
}
