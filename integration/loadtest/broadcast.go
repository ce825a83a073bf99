//go:build linux

package main

import (
	"context"
	"fmt"
	"math"
	"sync/atomic"
	"time"

	"github.com/sluice-proxy/sluice/internal/latency"
)

// broadcastResult is one broadcast run.
type broadcastResult struct {
	Target   string  `json:"target"`
	Size     int     `json:"size"` // bytes per message
	Rate     float64 `json:"rate_per_client"`
	Clients  int     `json:"clients"`
	Slow     int     `json:"slow"`
	Duration float64 `json:"duration_s"` // measured window

	// SentPerSec is the backend's broadcast rate over the window.
	SentPerSec float64 `json:"sent_per_s"`

	// Fast clients, over the measured window.
	FastMsgsPerSec  float64        `json:"fast_msgs_per_s"` // per fast client, mean
	FastReceived    int64          `json:"fast_received"`   // all fast clients
	FastP50         millis         `json:"fast_p50_ms"`
	FastP99         millis         `json:"fast_p99_ms"`
	FastMax         millis         `json:"fast_max_ms"`
	FastGaps        int64          `json:"fast_gaps"`
	FastDisorder    int64          `json:"fast_disorder"`
	FastClosed      int            `json:"fast_closed"` // fast clients whose connection ended
	FastCloseCounts map[string]int `json:"fast_closes"`

	// SlowCloses counts how slow clients ended, by outcome (a close code,
	// eof, rst or open).
	SlowCloses map[string]int `json:"slow_closes"`

	TargetPeakRSS  int64        `json:"target_peak_rss"` // bytes; 0 for direct
	TargetCPU      float64      `json:"target_cpu_s"`    // during the window
	BackendPeakRSS int64        `json:"backend_peak_rss"`
	BackendCPU     float64      `json:"backend_cpu_s"` // during the window
	HarnessCPU     float64      `json:"harness_cpu_s"` // during the window
	Backend        backendStats `json:"backend"`

	// The machine's TCP sockets (/proc/net/sockstat, machine-wide), sampled
	// with the RSS from just before the clients connect to the end of the
	// slow clients' close-wait, so sockets of evicted clients count. Memory
	// is the kernel's "mem" (pages, here in bytes) minus the baseline.
	TCPMemBaseline int64 `json:"tcp_mem_baseline"` // bytes, before the clients connected
	TCPMemPeak     int64 `json:"tcp_mem_peak"`     // bytes: peak minus baseline
	TCPMemEnd      int64 `json:"tcp_mem_end"`      // bytes: end of close-wait minus baseline
	TCPOrphanBase  int64 `json:"tcp_orphan_baseline"`
	TCPOrphanPeak  int64 `json:"tcp_orphan_peak"` // highest orphan count sampled
	TCPOrphanEnd   int64 `json:"tcp_orphan_end"`  // at the end of close-wait

	// Sluice only.
	SluicePeakQueued float64            `json:"sluice_peak_queued_bytes"`
	SluiceEvictions  map[string]float64 `json:"sluice_evictions"` // by reason
	SluiceDropped    float64            `json:"sluice_dropped_messages"`
}

// runBroadcast runs one broadcast measurement against spec.
func runBroadcast(ctx context.Context, r *runner, spec targetSpec) (res broadcastResult, err error) {
	cfg := r.cfg
	res = broadcastResult{Target: spec.label, Size: cfg.size, Rate: cfg.rate, Clients: cfg.clients, Slow: int(math.Round(float64(cfg.clients) * cfg.slow))}
	parts, err := startRun(ctx, r, spec, cfg.rate, 200*time.Millisecond, true)
	if err != nil {
		return res, err
	}
	defer parts.stop()
	be, tg, mon := parts.be, parts.tg, parts.mon

	// Connect every client; readers start at once, but nothing counts yet.
	var counting atomic.Bool
	var stopAt atomic.Int64
	stopAt.Store(math.MaxInt64)
	fast := make([]*fastClient, 0, cfg.clients-res.Slow)
	slow := make([]*slowClient, 0, res.Slow)
	kinds := spreadSlow(cfg.clients, res.Slow)
	conns := make([]*fastClient, cfg.clients)
	slows := make([]*slowClient, cfg.clients)
	defer func() {
		// However the run ends: close every client and wait for its reader.
		for i := range conns {
			if c := conns[i]; c != nil {
				c.conn.Close()
				<-c.done
			}
			if s := slows[i]; s != nil {
				s.conn.Close()
				select {
				case <-s.resume:
				default:
					close(s.resume)
				}
				<-s.done
			}
		}
	}()
	mon.tcpBaseline()
	_, err = connectAll(ctx, cfg.clients, cfg.workers, true, func(ctx context.Context, i int) error {
		if kinds[i] {
			c, err := dialWS(ctx, tg.url, i, socketOpts{rcvBuf: cfg.slowRcv, mss: cfg.slowMSS}, 1024)
			if err != nil {
				return fmt.Errorf("slow client %d: %w", i, err)
			}
			s := &slowClient{conn: c, resume: make(chan struct{}), done: make(chan struct{})}
			slows[i] = s
			go s.slowReader(&stopAt)
			return nil
		}
		c, err := dialWS(ctx, tg.url, i, socketOpts{}, 4096)
		if err != nil {
			return fmt.Errorf("fast client %d: %w", i, err)
		}
		f := &fastClient{conn: c, done: make(chan struct{})}
		conns[i] = f
		go f.fastReader(&counting)
		return nil
	})
	if err != nil {
		return res, err
	}
	for i := range conns {
		if conns[i] != nil {
			fast = append(fast, conns[i])
		}
		if slows[i] != nil {
			slow = append(slow, slows[i])
		}
	}

	// The measured window.
	sent0, err := be.stats()
	if err != nil {
		return res, err
	}
	window := broadcastWindow(cfg.duration, cfg.rate)
	prof := r.startProfile(ctx, tg, window)
	defer prof.stop()
	start := time.Now()
	tcpu0, bcpu0, hcpu0 := mon.now(tg.proc).CPU, mon.now(be.process).CPU, selfCPU()
	stopAt.Store(start.Add(cfg.slowAfter).UnixNano())
	counting.Store(true)
	if err := measuredWindow(ctx, "broadcast", be, tg, window); err != nil {
		return res, err
	}
	counting.Store(false)
	res.Duration = time.Since(start).Seconds()
	res.TargetCPU = mon.now(tg.proc).CPU - tcpu0
	res.BackendCPU = mon.now(be.process).CPU - bcpu0
	res.HarnessCPU = selfCPU() - hcpu0
	sent1, err := be.stats()
	if err != nil {
		return res, err
	}
	res.SentPerSec = float64(sent1.Broadcasts-sent0.Broadcasts) / res.Duration
	prof.end(ctx)

	// Slow clients read on for closeWait to see how they were closed.
	for _, s := range slow {
		s.conn.SetReadDeadline(time.Now().Add(cfg.closeWait))
		close(s.resume)
	}
	res.SlowCloses = map[string]int{}
	for _, s := range slow {
		<-s.done
		res.SlowCloses[s.outcome]++
	}

	mon.stopMonitor()
	mon.sample() // the sampler has stopped: one last sample, at the end of close-wait
	tbase, tpeak, tlast, err := mon.tcpFigures()
	if err != nil {
		return res, fmt.Errorf("/proc/net/sockstat: %w", err)
	}
	res.TCPMemBaseline, res.TCPMemPeak, res.TCPMemEnd = tbase.Mem, tpeak.Mem-tbase.Mem, tlast.Mem-tbase.Mem
	res.TCPOrphanBase, res.TCPOrphanPeak, res.TCPOrphanEnd = tbase.Orphan, tpeak.Orphan, tlast.Orphan
	res.TargetPeakRSS = mon.peak(tg.proc)
	res.BackendPeakRSS = mon.peak(be.process)
	if res.Backend, err = be.stats(); err != nil {
		return res, err
	}
	if tg.admin != "" {
		if res.SluicePeakQueued, err = mon.queuedPeak(); err != nil {
			return res, err
		}
		ms, err := scrapeMetrics(tg.admin, 3*time.Second)
		if err != nil {
			return res, err
		}
		res.SluiceEvictions = ms.byLabel("sluice_evictions_total", "reason")
		res.SluiceDropped = ms.sum("sluice_dropped_messages_total")
		res.SluicePeakQueued = max(res.SluicePeakQueued, ms.sum("sluice_queued_bytes"))
	}

	// Fast clients: stop them, then read what they measured.
	var all latency.Histogram
	res.FastCloseCounts = map[string]int{}
	for _, f := range fast {
		f.conn.Close()
		<-f.done
		all.Merge(&f.lat)
		res.FastReceived += f.received
		res.FastGaps += f.gaps
		res.FastDisorder += f.disorder
		if f.ended != "" {
			res.FastClosed++
			res.FastCloseCounts[f.ended]++
		}
	}
	if len(fast) > 0 && res.Duration > 0 {
		res.FastMsgsPerSec = float64(res.FastReceived) / float64(len(fast)) / res.Duration
	}
	res.FastP50, res.FastP99, res.FastMax = quantileMs(&all, 0.50), quantileMs(&all, 0.99), maxMs(&all)
	return res, nil
}

// broadcastWindow is the measured window for -duration d at rate
// messages a second: d rounded to a whole number of the backend's
// intervals, at least one. A window of n intervals holds n broadcasts
// and their deliveries wherever it starts; any other length holds one
// more or one fewer by chance, which at a message a second or so (9,000
// clients sharing a total rate) moves CPU per message by a tenth.
func broadcastWindow(d time.Duration, rate float64) time.Duration {
	if rate <= 0 {
		return d
	}
	interval := float64(time.Second) / rate
	return time.Duration(math.Round(max(1, math.Round(float64(d)/interval)) * interval))
}

// spreadSlow marks nSlow of n clients as slow, evenly spread.
func spreadSlow(n, nSlow int) []bool {
	kinds := make([]bool, n)
	for i := range n {
		kinds[i] = (i+1)*nSlow/n > i*nSlow/n
	}
	return kinds
}
