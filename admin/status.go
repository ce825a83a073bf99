package admin

import (
	"context"
	_ "embed"
	"encoding/json"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluice-proxy/sluice/proxy"
)

// statusHTML is the live status page: one self-contained file (CSS, JS and
// an inline SVG chart, no external assets) that polls /status.json.
//
//go:embed status.html
var statusHTML []byte

// Sizes of what the status page shows.
const (
	statusTopN       = 20              // deepest queues listed
	statusHistoryLen = 300             // samples kept: 5 minutes
	SampleTick       = 1 * time.Second // one sample per tick
)

// StatusPage answers "which client is slow, and since when is it bad?":
// /status.json lists the deepest queues and the recent evictions next to
// the totals, and keeps five minutes of history so a spike seen in an
// incident can be put in context. /status renders it for a browser.
//
// Everything but the history is read from the Server when asked, so two
// viewers cost two snapshots a second and nobody pays when nobody looks.
type StatusPage struct {
	srv      *proxy.Server
	gatherer prometheus.Gatherer // source of the eviction counters; may be nil
	policy   string
	done     chan struct{} // closed when statusSampler returns

	mu   sync.Mutex
	hist [statusHistoryLen]Sample // ring, oldest overwritten first; guarded by mu
	next int                      // guarded by mu
	n    int                      // guarded by mu
}

// NewStatusPage takes a first sample and starts the sampler goroutine,
// which runs until ctx ends; Wait waits for it. gatherer is the registry
// the proxy registers sluice_evictions_total into (nil: no per-reason
// eviction counts).
func NewStatusPage(ctx context.Context, srv *proxy.Server, gatherer prometheus.Gatherer, policy string) *StatusPage {
	p := &StatusPage{srv: srv, gatherer: gatherer, policy: policy, done: make(chan struct{})}
	p.sample(time.Now())
	go p.statusSampler(ctx)
	return p
}

// statusSampler records one history sample per tick until ctx ends.
func (p *StatusPage) statusSampler(ctx context.Context) {
	defer close(p.done)
	t := time.NewTicker(SampleTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			p.sample(now)
		}
	}
}

// Wait blocks until the sampler has stopped (after its ctx ended).
func (p *StatusPage) Wait() { <-p.done }

// sample appends the current totals to the history. Budget.Stats is a few
// atomic loads, so sampling costs nothing that grows with connections.
func (p *StatusPage) sample(now time.Time) {
	st := p.srv.Budget().Stats()
	p.record(Sample{T: now.UnixMilli(), QueuedBytes: st.QueuedBytes, Slow: st.Slow, Paused: st.Paused})
}

// record appends s to the history, overwriting the oldest sample when full.
func (p *StatusPage) record(s Sample) {
	p.mu.Lock()
	p.hist[p.next] = s
	p.next = (p.next + 1) % len(p.hist)
	p.n = min(p.n+1, len(p.hist))
	p.mu.Unlock()
}

// history returns the samples, oldest first.
func (p *StatusPage) history() []Sample {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]Sample, 0, p.n)
	for i := p.n; i > 0; i-- {
		out = append(out, p.hist[(p.next-i+len(p.hist))%len(p.hist)])
	}
	return out
}

// Status is the document /status.json serves; the demo reads it too.
// JSON field names are the page's and the browser tests' contract: add, do
// not rename.
type Status struct {
	Time      time.Time  `json:"time"`
	Policy    string     `json:"policy"`
	Totals    Totals     `json:"totals"`
	Top       []Session  `json:"top"`       // deepest queues first, at most statusTopN
	Evictions []Eviction `json:"evictions"` // newest first
	History   []Sample   `json:"history"`   // oldest first, one per second
}

// Totals are the process-wide counts of a Status.
type Totals struct {
	Connections int `json:"connections"`
	Slow        int `json:"slow"`         // took nothing for SLUICE_SLOW_CLIENT_AGE (limiter/progress.go)
	AllowedSlow int `json:"allowed_slow"` // what SLUICE_SLOW_CLIENT_MAX_RATIO allows now
	Paused      int `json:"paused"`
	Throttled   int `json:"throttled"` // clients an inbound limit held back within the last second
	// UpgradesInFlight and UpgradesQueued are the upgrades under way
	// toward the backend and those waiting for their turn (upgrade
	// pacing, SLUICE_UPSTREAM_MAX_HANDSHAKES); 0 without pacing.
	UpgradesInFlight int   `json:"upgrades_in_flight"`
	UpgradesQueued   int   `json:"upgrades_queued"`
	QueuedBytes      int64 `json:"queued_bytes"` // unsent_bytes included
	UnsentBytes      int64 `json:"unsent_bytes"` // held by the kernel, unacknowledged by the clients
	// UpstreamUnsentBytes is held by the kernel, unacknowledged by the
	// backend; queued_bytes includes it too.
	UpstreamUnsentBytes int64   `json:"upstream_unsent_bytes"`
	Ceiling             int64   `json:"ceiling_bytes"` // 0: no global ceiling
	Share               float64 `json:"share"`         // queued_bytes / ceiling_bytes; 0 without a ceiling
	Dropped             uint64  `json:"dropped"`       // messages discarded by the drop policy
	// Evictions counts every eviction since start; ByReason splits it
	// (slow, global_ceiling, slow_ratio, write_timeout, pong_timeout,
	// pause_timeout). Both are absent without a gatherer.
	Evictions         *uint64           `json:"evictions,omitempty"`
	EvictionsByReason map[string]uint64 `json:"evictions_by_reason,omitempty"`
	Draining          bool              `json:"draining"`
}

// Session is one row of a Status's deepest queues.
type Session struct {
	ID            uint64  `json:"id"`
	Client        string  `json:"client"`
	AgeSeconds    float64 `json:"age_seconds"`
	QueueMessages int     `json:"queue_messages"`
	QueueBytes    int64   `json:"queue_bytes"`  // unsent_bytes included
	UnsentBytes   int64   `json:"unsent_bytes"` // held by the kernel, unacknowledged by the client
	// UpstreamBytes waits for the backend, in sluice and in the kernel.
	UpstreamBytes int64  `json:"upstream_bytes"`
	State         string `json:"state"` // ok, slow or paused
}

// Eviction is one recent eviction of a Status.
type Eviction struct {
	Time          time.Time `json:"time"`
	ID            uint64    `json:"id"`
	Client        string    `json:"client"`
	Reason        string    `json:"reason"`
	QueueMessages int       `json:"queue_messages"`
	QueueBytes    int64     `json:"queue_bytes"`    // unsent_bytes included
	UnsentBytes   int64     `json:"unsent_bytes"`   // held by the kernel, unacknowledged by the client
	UpstreamBytes int64     `json:"upstream_bytes"` // waiting for the backend, in sluice and in the kernel
}

// Sample is one second of a Status's history.
type Sample struct {
	T           int64 `json:"t"` // unix milliseconds
	QueuedBytes int64 `json:"queued_bytes"`
	Slow        int   `json:"slow"`
	Paused      int   `json:"paused"`
}

// Session states, in the order the page colours them.
const (
	StateOK     = "ok"
	StateSlow   = "slow"
	StatePaused = "paused" // the upstream is not read until the queue drains
	// StateThrottled: the client's own sending is held back by an inbound
	// limit (SLUICE_CLIENT_MAX_*, SLUICE_UPSTREAM_MAX_MESSAGES_PER_SECOND).
	StateThrottled = "throttled"
)

// snapshot builds the document from the Server's current state.
func (p *StatusPage) snapshot() Status {
	// The eviction list first: the proxy counts an eviction before it
	// lists it, so counters read afterwards include every listed one.
	recent := p.srv.RecentEvictions()
	st := p.srv.Budget().Stats()
	t := Totals{
		Connections:         p.srv.Sessions(),
		Slow:                st.Slow,
		AllowedSlow:         st.AllowedSlow,
		Paused:              st.Paused,
		Throttled:           p.srv.ThrottledClients(),
		QueuedBytes:         st.QueuedBytes,
		UnsentBytes:         st.UnsentBytes,
		UpstreamUnsentBytes: st.UpstreamUnsentBytes,
		Ceiling:             st.Ceiling,
		Dropped:             st.DroppedTotal,
		Draining:            p.srv.Draining(),
	}
	t.UpgradesInFlight, t.UpgradesQueued = p.srv.UpstreamHandshakes()
	if st.Ceiling > 0 {
		t.Share = float64(st.QueuedBytes) / float64(st.Ceiling)
	}
	if byReason, ok := evictionCounts(p.gatherer); ok {
		var total uint64
		for _, n := range byReason {
			total += n
		}
		t.Evictions, t.EvictionsByReason = &total, byReason
	}
	now := time.Now()
	doc := Status{Time: now, Policy: p.policy, Totals: t, History: p.history()}
	for _, s := range topSessions(p.srv.Snapshot(), statusTopN) {
		state := StateOK
		switch {
		case s.Paused:
			state = StatePaused
		case s.Slow:
			state = StateSlow
		case s.Throttled:
			state = StateThrottled
		}
		doc.Top = append(doc.Top, Session{
			ID: s.ID, Client: s.Client, AgeSeconds: s.Age.Round(100 * time.Millisecond).Seconds(),
			QueueMessages: s.QueueMessages, QueueBytes: s.QueueBytes, UnsentBytes: s.UnsentBytes, UpstreamBytes: s.UpstreamBytes, State: state,
		})
	}
	for _, e := range recent {
		doc.Evictions = append(doc.Evictions, Eviction{
			Time: e.Time, ID: e.ID, Client: e.Client, Reason: e.Reason,
			QueueMessages: e.QueueMessages, QueueBytes: e.QueueBytes, UnsentBytes: e.UnsentBytes, UpstreamBytes: e.UpstreamBytes,
		})
	}
	// Empty lists, not null, so the page can iterate without checks.
	if doc.Top == nil {
		doc.Top = []Session{}
	}
	if doc.Evictions == nil {
		doc.Evictions = []Eviction{}
	}
	return doc
}

// evictionCounts reads sluice_evictions_total by reason from g. The proxy
// keeps the counts only as Prometheus series, so this gathers the whole
// registry: fine once a second per viewer, not for a hot path.
func evictionCounts(g prometheus.Gatherer) (map[string]uint64, bool) {
	if g == nil {
		return nil, false
	}
	mfs, _ := g.Gather() // partial results are still worth showing
	out := map[string]uint64{}
	for _, mf := range mfs {
		if mf.GetName() != "sluice_evictions_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" {
					out[l.GetValue()] += uint64(m.GetCounter().GetValue())
				}
			}
		}
	}
	return out, true
}

// topSessions returns the k sessions with the deepest queues (bytes of
// both directions, then messages, then oldest id first), deepest first; those that are slow,
// paused or throttled come before those that are ok, whatever their
// queues (an ok client's queue may hold a message or two in flight).
// It keeps a sorted window of k instead of sorting all sessions: O(n) for
// the usual case of many shallow queues.
func notOK(s proxy.SessionInfo) bool { return s.Paused || s.Slow || s.Throttled }

func topSessions(all []proxy.SessionInfo, k int) []proxy.SessionInfo {
	deeper := func(a, b proxy.SessionInfo) bool {
		if an, bn := notOK(a), notOK(b); an != bn {
			return an
		}
		// What a session holds, both directions, as the ceiling weighs it.
		if ab, bb := a.QueueBytes+a.UpstreamBytes, b.QueueBytes+b.UpstreamBytes; ab != bb {
			return ab > bb
		}
		if a.QueueMessages != b.QueueMessages {
			return a.QueueMessages > b.QueueMessages
		}
		return a.ID < b.ID
	}
	if k <= 0 {
		return nil
	}
	top := make([]proxy.SessionInfo, 0, min(k, len(all)))
	for _, s := range all {
		if len(top) == k && !deeper(s, top[k-1]) {
			continue
		}
		i := len(top)
		if i < k {
			top = append(top, s)
		} else {
			i = k - 1
		}
		for ; i > 0 && deeper(s, top[i-1]); i-- {
			top[i] = top[i-1]
		}
		top[i] = s
	}
	return top
}

// serveJSON answers /status.json.
func (p *StatusPage) serveJSON(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	json.NewEncoder(w).Encode(p.snapshot())
}

// servePage answers /status with the embedded page.
func (p *StatusPage) servePage(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Write(statusHTML)
}
