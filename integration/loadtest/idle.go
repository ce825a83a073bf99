//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// settle is how long the harness lets the processes settle before and
// after connecting, before sampling memory.
const settle = time.Second

// idleResult is one idle run.
type idleResult struct {
	Target        string  `json:"target"`
	Conns         int     `json:"conns"` // connected
	ConnectErrors int     `json:"connect_errors"`
	FirstError    string  `json:"first_error,omitempty"`
	ConnectSecs   float64 `json:"connect_s"`
	Hold          float64 `json:"hold_s"`

	// Resident sets of the target's group: before any connection, once all
	// are connected (and settled), and at the end of the hold.
	TargetRSSBefore    int64 `json:"target_rss_before"`
	TargetRSSConnected int64 `json:"target_rss_connected"`
	TargetRSSEnd       int64 `json:"target_rss_end"`
	// The same for the backend.
	BackendRSSBefore    int64 `json:"backend_rss_before"`
	BackendRSSConnected int64 `json:"backend_rss_connected"`

	TargetHoldCPU  float64 `json:"target_hold_cpu_s"`
	BackendHoldCPU float64 `json:"backend_hold_cpu_s"`
	HarnessHoldCPU float64 `json:"harness_hold_cpu_s"`

	// Connections that ended on their own: before the hold (while
	// connecting and settling) and during it.
	EarlyDisconnects int            `json:"early_disconnects"`
	HoldDisconnects  int            `json:"hold_disconnects"`
	DisconnectCodes  map[string]int `json:"disconnect_codes,omitempty"`
	PingsPerConn     float64        `json:"pings_per_conn"` // received during the hold

	// Sluice only, from its /metrics: Go heap and stack in use, before any
	// connection and at the end of the hold.
	HeapBefore  float64 `json:"heap_inuse_before"`
	HeapEnd     float64 `json:"heap_inuse_end"`
	StackBefore float64 `json:"stack_inuse_before"`
	StackEnd    float64 `json:"stack_inuse_end"`
	Goroutines  float64 `json:"goroutines_end"`
	// Where the rest of the RSS goes: the runtime's own metadata (spans,
	// GC, profiling buckets, other), and heap pages free but not returned
	// to the OS.
	RuntimeBefore  float64 `json:"runtime_sys_before"`
	RuntimeEnd     float64 `json:"runtime_sys_end"`
	HeapFreeBefore float64 `json:"heap_free_retained_before"`
	HeapFreeEnd    float64 `json:"heap_free_retained_end"`
}

// runtimeSys is the Go runtime's memory for its own bookkeeping.
func runtimeSys(ms metricSet) float64 {
	return ms.sum("go_memstats_mspan_inuse_bytes") + ms.sum("go_memstats_mcache_inuse_bytes") +
		ms.sum("go_memstats_gc_sys_bytes") + ms.sum("go_memstats_other_sys_bytes") +
		ms.sum("go_memstats_buck_hash_sys_bytes")
}

// heapFreeRetained is heap memory free but not returned to the OS.
func heapFreeRetained(ms metricSet) float64 {
	return ms.sum("go_memstats_heap_idle_bytes") - ms.sum("go_memstats_heap_released_bytes")
}

// perConn divides a growth in bytes by the connections, in KiB.
func (r idleResult) perConn(before, after float64) float64 {
	if r.Conns == 0 {
		return 0
	}
	return (after - before) / float64(r.Conns) / 1024
}

// runIdle holds cfg.clients idle connections through spec.
func runIdle(ctx context.Context, r *runner, spec targetSpec) (res idleResult, err error) {
	cfg := r.cfg
	res = idleResult{Target: spec.label}
	parts, err := startRun(ctx, r, spec, 0, 200*time.Millisecond, false)
	if err != nil {
		return res, err
	}
	defer parts.stop()
	be, tg, mon := parts.be, parts.tg, parts.mon

	if err := sleep(ctx, settle); err != nil {
		return res, err
	}
	res.TargetRSSBefore = mon.now(tg.proc).RSS
	res.BackendRSSBefore = mon.now(be.process).RSS
	var before metricSet
	if tg.admin != "" {
		if before, err = scrapeMetrics(tg.admin, 3*time.Second); err != nil {
			return res, err
		}
		res.HeapBefore = before.sum("go_memstats_heap_inuse_bytes")
		res.StackBefore = before.sum("go_memstats_stack_inuse_bytes")
		res.RuntimeBefore, res.HeapFreeBefore = runtimeSys(before), heapFreeRetained(before)
	}

	fleet := &idleFleet{}
	defer fleet.closeAll(10 * time.Second)
	t0 := time.Now()
	failed, firstErr := connectAll(ctx, cfg.clients, cfg.workers, false, func(ctx context.Context, i int) error {
		c, err := dialWS(ctx, tg.url, i, socketOpts{}, 1024)
		if err != nil {
			return err
		}
		fleet.add(c)
		return nil
	})
	res.ConnectSecs = time.Since(t0).Seconds()
	if ctx.Err() != nil {
		return res, fmt.Errorf("connecting: %w", ctx.Err())
	}
	res.ConnectErrors = failed
	if firstErr != nil {
		res.FirstError = firstErr.Error()
		fmt.Fprintf(r.stderr, "loadtest: %d of %d connections failed; the first: %v\n", failed, cfg.clients, firstErr)
	}
	if failed == cfg.clients {
		return res, fmt.Errorf("no connection succeeded: %v", firstErr)
	}
	if err := sleep(ctx, settle); err != nil {
		return res, err
	}
	fleet.mu.Lock()
	res.Conns = len(fleet.conns) - fleet.early
	fleet.mu.Unlock()
	res.TargetRSSConnected = mon.now(tg.proc).RSS
	res.BackendRSSConnected = mon.now(be.process).RSS

	// The hold window.
	tcpu0, bcpu0, hcpu0 := mon.now(tg.proc).CPU, mon.now(be.process).CPU, selfCPU()
	pings0 := fleet.pings.Load()
	fleet.holding.Store(true)
	prof := r.startProfile(ctx, tg, cfg.duration)
	defer prof.stop()
	hold := time.Now()
	if err := sleep(ctx, cfg.duration); err != nil {
		return res, err
	}
	if !be.alive() {
		return res, be.failure()
	}
	if tg.proc != nil && !tg.proc.alive() {
		return res, tg.proc.failure()
	}
	fleet.holding.Store(false)
	res.Hold = time.Since(hold).Seconds()
	end := mon.now(tg.proc)
	res.TargetHoldCPU = end.CPU - tcpu0
	res.TargetRSSEnd = end.RSS
	res.BackendHoldCPU = mon.now(be.process).CPU - bcpu0
	res.HarnessHoldCPU = selfCPU() - hcpu0
	fleet.mu.Lock()
	res.EarlyDisconnects = fleet.early
	res.HoldDisconnects = fleet.dropped
	res.DisconnectCodes = fleet.dropReasons
	fleet.mu.Unlock()
	if res.Conns > 0 {
		res.PingsPerConn = float64(fleet.pings.Load()-pings0) / float64(res.Conns)
	}
	if tg.admin != "" {
		after, err := scrapeMetrics(tg.admin, 3*time.Second)
		if err != nil {
			return res, err
		}
		res.HeapEnd = after.sum("go_memstats_heap_inuse_bytes")
		res.StackEnd = after.sum("go_memstats_stack_inuse_bytes")
		res.RuntimeEnd, res.HeapFreeEnd = runtimeSys(after), heapFreeRetained(after)
		res.Goroutines = after.sum("go_goroutines")
	}
	// After the scrape: the heap profile's GC and serving it must not be
	// in HeapEnd.
	prof.end(ctx)
	return res, nil
}

// idleFailures turns connections lost or refused into the invocation's
// error: an idle connection must neither fail nor drop.
func idleFailures(res [][]idleResult) error {
	var errs []error
	for _, rs := range res {
		for i, x := range rs {
			if x.ConnectErrors > 0 || x.EarlyDisconnects > 0 || x.HoldDisconnects > 0 {
				errs = append(errs, fmt.Errorf("%s (round %d): %d connections failed, %d dropped while connecting, %d dropped during the hold %v",
					x.Target, i+1, x.ConnectErrors, x.EarlyDisconnects, x.HoldDisconnects, x.DisconnectCodes))
			}
		}
	}
	return errors.Join(errs...)
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
