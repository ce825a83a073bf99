//go:build linux

package main

// Storm mode: a reconnect storm. -clients connect through the target and
// idle; then the backend process is stopped and a new one started on the
// same address, and every client reconnects at once, retrying with
// jittered exponential backoff (full jitter, 100 ms doubling to 5 s).
// The new backend takes -upgrade-delay per upgrade, as one warming up
// after a restart. Reported: the time until every client that was
// connected is back, the backend's peak of upgrades in progress at once
// and its upgrade rate, the clients' refusals, and the proxy's CPU.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"regexp"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

const (
	stormBackoffBase = 100 * time.Millisecond
	stormBackoffMax  = 5 * time.Second
)

// stormBackoff is the wait before retry number attempt (0: the first
// reconnect): full jitter over an exponentially growing window.
func stormBackoff(attempt int) time.Duration {
	window := stormBackoffBase << min(attempt, 10)
	return rand.N(min(window, stormBackoffMax))
}

// --- the backend's side -------------------------------------------------------

// upgradeCounter sits in front of the backend's upgrade handler: each
// upgrade first waits in hold (nil: not at all), and the upgrades inside
// that wait at once are counted, with their peak and the times of the
// first and last.
type upgradeCounter struct {
	next http.Handler
	hold func()

	mu       sync.Mutex // guards the fields below
	inFlight int
	stats    upgradeStats
}

// upgradeStats is what the backend reports on /upgrades.
type upgradeStats struct {
	Upgrades     int64 `json:"upgrades"`
	PeakInFlight int   `json:"peak_in_flight"`
	FirstNs      int64 `json:"first_ns"` // Unix nanoseconds of the first upgrade's arrival
	LastNs       int64 `json:"last_ns"`  // and of the last one's
}

// newUpgradeCounter delays every upgrade to next by delay: the backend's
// slowness under test.
func newUpgradeCounter(next http.Handler, delay time.Duration) *upgradeCounter {
	u := &upgradeCounter{next: next}
	if delay > 0 {
		u.hold = func() { time.Sleep(delay) }
	}
	return u
}

func (u *upgradeCounter) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	now := time.Now().UnixNano()
	u.mu.Lock()
	u.inFlight++
	s := &u.stats
	s.Upgrades++
	s.PeakInFlight = max(s.PeakInFlight, u.inFlight)
	if s.FirstNs == 0 {
		s.FirstNs = now
	}
	s.LastNs = now
	u.mu.Unlock()
	if u.hold != nil {
		u.hold()
	}
	u.mu.Lock()
	u.inFlight--
	u.mu.Unlock()
	u.next.ServeHTTP(w, r)
}

func (u *upgradeCounter) serveStats(w http.ResponseWriter, _ *http.Request) {
	u.mu.Lock()
	s := u.stats
	u.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(s)
}

// upgrades fetches the backend's /upgrades.
func (b *backendProc) upgrades() (upgradeStats, error) {
	var s upgradeStats
	client := http.Client{Timeout: 3 * time.Second}
	resp, err := client.Get("http://" + b.addr + "/upgrades")
	if err != nil {
		return s, fmt.Errorf("backend upgrades: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return s, fmt.Errorf("backend upgrades: %s", resp.Status)
	}
	return s, json.NewDecoder(resp.Body).Decode(&s)
}

// --- the clients' side --------------------------------------------------------

// stormResult is one storm run.
type stormResult struct {
	Target  string `json:"target"`
	Clients int    `json:"clients"`
	// Connected is how many clients were connected when the backend was
	// stopped; Back, how many connections were made again after.
	Connected int `json:"connected"`
	Back      int `json:"back"`
	// BackAfter is the time from stopping the backend until the last of
	// Connected was back, when AllBack (within -duration); Restart, from
	// stopping it until the new one listened.
	AllBack   bool    `json:"all_back"`
	BackAfter float64 `json:"back_after_s"`
	Restart   float64 `json:"restart_s"`
	// What the new backend saw: upgrades, the most in progress at once,
	// and their rate from its first to its last.
	Upgrades     int64   `json:"backend_upgrades"`
	PeakInFlight int     `json:"backend_peak_in_flight"`
	UpgradeRate  float64 `json:"backend_upgrades_per_s"`
	// Refusals are the clients' failed attempts after the stop, by kind
	// (an HTTP status, or how the connection failed).
	Refusals  map[string]int `json:"refusals,omitempty"`
	TargetCPU float64        `json:"target_cpu_s"` // from the stop until every client was back (or -duration)
}

// stormFleet is the clients of a storm run.
type stormFleet struct {
	url     string
	workers chan struct{} // bounds the first connects, as connectAll does

	connected atomic.Int64 // open now
	stormAt   atomic.Int64 // Unix nanoseconds of the stop; 0 before it
	back      atomic.Int64 // connections made after the stop
	lastBack  atomic.Int64 // Unix nanoseconds of the latest

	mu       sync.Mutex
	conns    map[*websocket.Conn]struct{} // open connections, for stop; guarded by mu
	stopped  bool                         // closeAll was called; guarded by mu
	refusals map[string]int               // after the stop; guarded by mu
	wg       sync.WaitGroup
}

// stormClient is client i's loop: connect, read until the connection
// ends, reconnect with backoff, until ctx ends.
func (f *stormFleet) stormClient(ctx context.Context, i int) {
	defer f.wg.Done()
	first := true
	attempt := 0
	for ctx.Err() == nil {
		if first {
			f.workers <- struct{}{}
		}
		c, err := dialWS(ctx, f.url, i, socketOpts{}, 512)
		if first {
			<-f.workers
			first = false
		}
		if err != nil {
			if f.stormAt.Load() != 0 && ctx.Err() == nil {
				f.mu.Lock()
				f.refusals[refusalKind(err)]++
				f.mu.Unlock()
			}
			sleep(ctx, stormBackoff(attempt))
			attempt++
			continue
		}
		attempt = 0
		if f.stormAt.Load() != 0 {
			f.back.Add(1)
			f.lastBack.Store(time.Now().UnixNano())
		}
		f.mu.Lock()
		if f.stopped {
			// Connected after closeAll: nobody else will close it.
			f.mu.Unlock()
			c.Close()
			return
		}
		f.conns[c] = struct{}{}
		f.mu.Unlock()
		f.connected.Add(1)
		for {
			if _, _, err := c.NextReader(); err != nil {
				break
			}
		}
		f.connected.Add(-1)
		f.mu.Lock()
		delete(f.conns, c)
		f.mu.Unlock()
		c.Close()
		sleep(ctx, stormBackoff(0)) // the reconnect, jittered
	}
}

// closeAll closes every open connection, ending the clients' reads.
func (f *stormFleet) closeAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stopped = true
	for c := range f.conns {
		c.Close()
	}
}

var httpStatusInError = regexp.MustCompile(`\(HTTP (\d{3})`)

// refusalKind names a failed attempt: its HTTP status, or how it failed.
func refusalKind(err error) string {
	if m := httpStatusInError.FindStringSubmatch(err.Error()); m != nil {
		return m[1]
	}
	return errorKind(err)
}

// waitUntil polls cond every 10 ms until it holds or ctx ends.
func waitUntil(ctx context.Context, cond func() bool) bool {
	for !cond() {
		if sleep(ctx, 10*time.Millisecond) != nil {
			return false
		}
	}
	return true
}

// runStorm runs one storm through spec.
func runStorm(ctx context.Context, r *runner, spec targetSpec) (res stormResult, err error) {
	cfg := r.cfg
	res = stormResult{Target: spec.label, Clients: cfg.clients}
	parts, err := startRun(ctx, r, spec, 0, time.Second, false)
	if err != nil {
		return res, err
	}
	defer func() { parts.stop() }() // parts.be is the new backend by then
	tg := parts.tg

	f := &stormFleet{url: tg.url, workers: make(chan struct{}, cfg.workers),
		conns: map[*websocket.Conn]struct{}{}, refusals: map[string]int{}}
	cctx, stopClients := context.WithCancel(ctx)
	defer func() {
		stopClients()
		f.closeAll()
		// A client waiting in a proxy's queue ends at its handshake
		// timeout: gorilla's handshake does not watch the context.
		if !waitGroup(&f.wg, dialTimeout+5*time.Second) {
			err = errors.Join(err, fmt.Errorf("storm: clients did not stop within %v", dialTimeout+5*time.Second))
		}
	}()
	for i := range cfg.clients {
		f.wg.Add(1)
		go f.stormClient(cctx, i)
	}
	// Everyone connected, or as many as the target lets in within
	// -duration (a proxy whose limit a session holds lets in no more).
	setup, cancel := context.WithTimeout(ctx, cfg.duration)
	waitUntil(setup, func() bool { return f.connected.Load() == int64(cfg.clients) })
	cancel()
	if ctx.Err() != nil {
		return res, fmt.Errorf("storm: %w", ctx.Err())
	}
	res.Connected = int(f.connected.Load())

	// The storm: stop the backend, start a new one on its address.
	cpu0 := targetCPU(tg)
	stopAt := time.Now()
	f.stormAt.Store(stopAt.UnixNano())
	old := parts.be
	old.stop()
	be, err := startBackendOn(ctx, r, old.addr, 0, r.runBudget())
	if err != nil {
		return res, fmt.Errorf("storm: restart the backend: %w", err)
	}
	parts.be = be
	res.Restart = time.Since(stopAt).Seconds()
	wait, cancel := context.WithTimeout(ctx, cfg.duration)
	all := waitUntil(wait, func() bool { return f.back.Load() >= int64(res.Connected) })
	cancel()
	res.TargetCPU = targetCPU(tg) - cpu0
	res.Back = int(f.back.Load())
	res.AllBack = all
	if all {
		res.BackAfter = float64(f.lastBack.Load()-stopAt.UnixNano()) / 1e9
	}
	st, err := be.upgrades()
	if err != nil {
		return res, err
	}
	res.Upgrades, res.PeakInFlight = st.Upgrades, st.PeakInFlight
	if st.LastNs > st.FirstNs {
		res.UpgradeRate = float64(st.Upgrades) / (float64(st.LastNs-st.FirstNs) / 1e9)
	}
	f.mu.Lock()
	if len(f.refusals) > 0 {
		res.Refusals = f.refusals
	}
	f.mu.Unlock()
	if !be.alive() {
		return res, be.failure()
	}
	if tg.proc != nil && !tg.proc.alive() {
		return res, tg.proc.failure()
	}
	return res, nil
}

// targetCPU is the user+system seconds of the target's process group; 0
// for direct.
func targetCPU(tg *target) float64 {
	if tg.proc == nil {
		return 0
	}
	return sampleGroups(tg.proc.pgid)[tg.proc.pgid].CPU
}

func writeStormReport(w io.Writer, r *runner, res [][]stormResult) {
	fmt.Fprintf(w, "%d clients connect and idle; the backend is stopped and restarted on its address, taking %v per upgrade; "+
		"every client reconnects with full-jitter backoff (100 ms doubling to 5 s); at most %v to connect and again to be back; %s.\n\n",
		r.cfg.clients, r.cfg.upgradeDelay, r.cfg.duration, rounds(r))
	t := table{header: []string{"target", "connected", "back", "all back after s", "backend restart s",
		"backend peak upgrades in flight", "backend upgrades/s", "backend upgrades", "refusals", "target CPU s"}}
	for i, rs := range res {
		if len(rs) == 0 {
			continue
		}
		kind := r.cfg.targets[i].kind
		f := func(g func(stormResult) float64) float64 { return med(rs, g) }
		t.add(rs[0].Target,
			each(rs, func(x stormResult) string { return fmt.Sprintf("%d/%d", x.Connected, x.Clients) }),
			each(rs, func(x stormResult) string { return fmt.Sprint(x.Back) }),
			each(rs, func(x stormResult) string {
				if !x.AllBack {
					return "not within -duration"
				}
				return num(x.BackAfter, 2)
			}),
			num(f(func(x stormResult) float64 { return x.Restart }), 2),
			num(f(func(x stormResult) float64 { return float64(x.PeakInFlight) }), 0),
			num(f(func(x stormResult) float64 { return x.UpgradeRate }), 0),
			num(f(func(x stormResult) float64 { return float64(x.Upgrades) }), 0),
			each(rs, func(x stormResult) string {
				if len(x.Refusals) == 0 {
					return "0"
				}
				n := 0
				for _, v := range x.Refusals {
					n += v
				}
				return fmt.Sprintf("%d (%s)", n, counts(x.Refusals))
			}),
			onlyIf(kind != kindDirect, num(f(func(x stormResult) float64 { return x.TargetCPU }), 2)),
		)
	}
	t.write(w)
	fmt.Fprint(w, `
- connected: clients connected when the backend was stopped (a proxy whose limit a session holds
  lets in no more than it); back: connections made again after; all back after: from the stop
  to the last of them. Backend columns are the restarted backend's: upgrades in progress at once
  (from the request to the 101) and their rate from the first to the last. Refusals: the clients'
  failed attempts after the stop, by HTTP status or failure. Target CPU: user+system seconds from
  the stop until all were back.
`)
}
