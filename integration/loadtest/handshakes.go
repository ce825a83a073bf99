//go:build linux

package main

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/sluice-proxy/sluice/internal/latency"
)

// handshakeResult is one handshakes run.
type handshakeResult struct {
	Target     string         `json:"target"`
	Workers    int            `json:"workers"`
	Duration   float64        `json:"duration_s"`
	Handshakes int64          `json:"handshakes"` // upgrades that succeeded
	Rate       float64        `json:"per_s"`
	P50        millis         `json:"p50_ms"` // connect + upgrade
	P99        millis         `json:"p99_ms"`
	Max        millis         `json:"max_ms"`
	Errors     int64          `json:"errors"`
	ErrorKinds map[string]int `json:"error_kinds,omitempty"`
	// CloseNot1000 counts closes that did not come back as 1000.
	CloseNot1000 int64   `json:"close_not_1000"`
	TargetCPU    float64 `json:"target_cpu_s"`
	BackendCPU   float64 `json:"backend_cpu_s"`
	HarnessCPU   float64 `json:"harness_cpu_s"`
}

// runHandshakes runs cfg.workers loops of connect, upgrade, close through
// spec for cfg.duration.
func runHandshakes(ctx context.Context, r *runner, spec targetSpec) (res handshakeResult, err error) {
	cfg := r.cfg
	res = handshakeResult{Target: spec.label, Workers: cfg.workers}
	parts, err := startRun(ctx, r, spec, 0, time.Second, false)
	if err != nil {
		return res, err
	}
	defer parts.stop()
	be, tg, mon := parts.be, parts.tg, parts.mon

	prof := r.startProfile(ctx, tg, cfg.duration)
	defer prof.stop()
	start := time.Now()
	until := start.Add(cfg.duration)
	tcpu0, bcpu0, hcpu0 := mon.now(tg.proc).CPU, mon.now(be.process).CPU, selfCPU()
	hists := make([]latency.Histogram, cfg.workers)
	var ok, failed, not1000 atomic.Int64
	var mu sync.Mutex
	kinds := map[string]int{}
	var wg sync.WaitGroup
	for w := range cfg.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			handshakeWorker(ctx, w, cfg.workers, tg.url, until, &hists[w], &ok, &not1000, func(err error) {
				failed.Add(1)
				mu.Lock()
				kinds[errorKind(err)]++
				mu.Unlock()
			})
		}()
	}
	wg.Wait()
	if ctx.Err() != nil {
		return res, fmt.Errorf("handshakes: %w", ctx.Err())
	}
	res.Duration = time.Since(start).Seconds()
	res.TargetCPU = mon.now(tg.proc).CPU - tcpu0
	res.BackendCPU = mon.now(be.process).CPU - bcpu0
	res.HarnessCPU = selfCPU() - hcpu0
	prof.end(ctx)
	var all latency.Histogram
	for i := range hists {
		all.Merge(&hists[i])
	}
	res.Handshakes, res.Errors, res.CloseNot1000 = ok.Load(), failed.Load(), not1000.Load()
	res.Rate = float64(res.Handshakes) / res.Duration
	res.P50, res.P99, res.Max = quantileMs(&all, 0.50), quantileMs(&all, 0.99), maxMs(&all)
	if len(kinds) > 0 {
		res.ErrorKinds = kinds
	}
	if !be.alive() {
		return res, be.failure()
	}
	if tg.proc != nil && !tg.proc.alive() {
		return res, tg.proc.failure()
	}
	return res, nil
}

// handshakeWorker connects, upgrades and closes (1000, waiting for the
// echo) in a loop until until. Worker w of n uses source addresses w,
// w+n, w+2n, … in turn, spreading TIME_WAIT over them.
func handshakeWorker(ctx context.Context, w, n int, url string, until time.Time, h *latency.Histogram, ok, not1000 *atomic.Int64, fail func(error)) {
	for i := w; time.Now().Before(until) && ctx.Err() == nil; i += n {
		t0 := time.Now()
		c, err := dialWS(ctx, url, i, socketOpts{}, 1024)
		if err != nil {
			fail(err)
			sleep(ctx, 10*time.Millisecond) // no hot loop against a refusing target
			continue
		}
		h.Record(time.Since(t0))
		ok.Add(1)
		deadline := time.Now().Add(2 * time.Second)
		c.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), deadline)
		c.SetReadDeadline(deadline)
		for {
			if _, _, err := c.NextReader(); err != nil {
				if outcome(err) != "1000" {
					not1000.Add(1)
				}
				break
			}
		}
		c.Close()
	}
}

// errorKind shortens a dial error for counting.
func errorKind(err error) string {
	switch o := outcome(err); o {
	case "error":
		s := err.Error()
		if len(s) > 80 {
			s = s[:80] + "…"
		}
		return s
	default:
		return o
	}
}
