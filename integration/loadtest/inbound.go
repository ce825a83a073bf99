//go:build linux

package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/sluice-proxy/sluice/internal/latency"
	"github.com/sluice-proxy/sluice/internal/naive"
)

// Inbound mode: clients that send too much. Normal clients send numbered,
// timestamped messages at -rate each; flooders send as fast as their
// window of unanswered messages allows. The backend echoes every message
// after -work of busy CPU, and counts messages by client id, so the
// harness sees what reached the backend from whom, and every client checks
// that each of its messages came back, in order.

const (
	// echoHeaderLen is what a client message carries: sequence number,
	// send time, client id.
	echoHeaderLen = naive.EchoHeaderLen
	// inboundWarmup runs the senders before the measured window, so a
	// client's first second's burst allowance is spent and the backend's
	// queues have filled before anything counts.
	inboundWarmup = 2 * time.Second
	// drainIdle and drainMax bound the wait for echoes after the senders
	// stop: until every message came back, nothing came back for
	// drainIdle, or drainMax passed.
	drainIdle = 3 * time.Second
	drainMax  = 30 * time.Second
)

// seqCheck follows the sequence numbers of one client's echoes.
type seqCheck struct {
	next     uint64 // expected next; 0 before the first echo (then 1)
	gaps     int64  // messages skipped over
	disorder int64  // echoes whose number went backwards or repeated
}

// see takes the next echo's sequence number.
func (s *seqCheck) see(seq uint64) {
	if s.next == 0 {
		s.next = 1
	}
	switch {
	case seq == s.next:
		s.next++
	case seq > s.next:
		s.gaps += int64(seq - s.next)
		s.next = seq + 1
	default:
		s.disorder++
	}
}

// echoClient is one inbound client: a sender goroutine and a reader
// goroutine on one gorilla connection (gorilla allows one of each).
type echoClient struct {
	id      uint64
	flooder bool
	conn    *websocket.Conn
	window  chan struct{} // flooders: a token per message awaiting its echo

	sent   atomic.Int64 // messages written; by the sender
	echoed atomic.Int64 // echoes read; by the reader

	sendDone chan struct{}
	readDone chan struct{}

	// Owned by the reader until readDone closes.
	lat     latency.Histogram // echo latency, while counting
	inWin   int64             // echoes while counting
	seq     seqCheck
	ended   string // how the connection ended, unless the harness closed it
	stopped *atomic.Bool
}

// inboundSender is a client's sending goroutine: a normal client at its
// rate from its phase offset (catching up after a stall), a flooder
// whenever its window has room. It stops on stop or a write error.
func (c *echoClient) inboundSender(start time.Time, interval time.Duration, size int, stop <-chan struct{}) {
	defer close(c.sendDone)
	msg := make([]byte, size)
	binary.BigEndian.PutUint64(msg[16:], c.id)
	var t *time.Timer
	if !c.flooder {
		t = time.NewTimer(time.Until(start))
		defer t.Stop()
	}
	next := start
	for seq := uint64(1); ; seq++ {
		if c.flooder {
			select {
			case c.window <- struct{}{}:
			case <-stop:
				return
			}
		} else {
			select {
			case <-t.C:
			case <-stop:
				return
			}
			next = next.Add(interval)
			t.Reset(time.Until(next))
		}
		binary.BigEndian.PutUint64(msg, seq)
		binary.BigEndian.PutUint64(msg[8:], uint64(time.Now().UnixNano()))
		if err := c.conn.WriteMessage(websocket.BinaryMessage, msg); err != nil {
			return
		}
		c.sent.Add(1)
	}
}

// inboundReader is a client's reading goroutine.
func (c *echoClient) inboundReader(counting *atomic.Bool, echoes *atomic.Int64) {
	defer close(c.readDone)
	var hdr [echoHeaderLen]byte
	for {
		now, err := readMessageHeader(c.conn, hdr[:])
		if err != nil {
			if !c.stopped.Load() {
				c.ended = outcome(err)
			}
			return
		}
		if c.flooder {
			select {
			case <-c.window:
			default: // an echo of nothing sent: disorder counts it
			}
		}
		c.seq.see(binary.BigEndian.Uint64(hdr[:]))
		if counting.Load() {
			c.inWin++
			c.lat.Record(time.Duration(now - int64(binary.BigEndian.Uint64(hdr[8:]))))
		}
		c.echoed.Add(1)
		echoes.Add(1)
	}
}

// inboundResult is one inbound run.
type inboundResult struct {
	Target   string  `json:"target"`
	Clients  int     `json:"clients"`  // normal ones
	Flooders int     `json:"flooders"` // flooding ones
	Duration float64 `json:"duration_s"`

	// At the backend, over the measured window.
	BackendPerSec float64 `json:"backend_msgs_per_s"`  // all clients
	FlooderPerSec float64 `json:"flooder_msgs_per_s"`  // all flooders together
	NormalPerSec  float64 `json:"normal_msgs_per_s"`   // all normal clients together
	ShareMedian   float64 `json:"normal_share_median"` // messages of the median normal client
	ShareMin      float64 `json:"normal_share_min"`    // least normal client ÷ median
	ShareMax      float64 `json:"normal_share_max"`    // most normal client ÷ median

	// Normal clients' echoes during the window: send to echo.
	NormalEchoes int64  `json:"normal_echoes"`
	NormalP50    millis `json:"normal_p50_ms"`
	NormalP99    millis `json:"normal_p99_ms"`
	NormalMax    millis `json:"normal_max_ms"`

	// Whole run, after the drain: messages sent, and sent but never echoed.
	NormalSent  int64          `json:"normal_sent"`
	NormalLost  int64          `json:"normal_lost"`
	FlooderSent int64          `json:"flooder_sent"`
	FlooderLost int64          `json:"flooder_lost"`
	Gaps        int64          `json:"gaps"`     // echoes skipped over, all clients
	Disorder    int64          `json:"disorder"` // echoes out of order, all clients
	Drain       float64        `json:"drain_s"`  // waiting for the last echoes
	NormalEnded map[string]int `json:"normal_ended,omitempty"`
	FloodEnded  map[string]int `json:"flooder_ended,omitempty"`

	TargetRSSStart int64   `json:"target_rss_start"` // window start; 0 for direct
	TargetRSSEnd   int64   `json:"target_rss_end"`   // window end
	TargetPeakRSS  int64   `json:"target_peak_rss"`  // whole run
	TargetCPU      float64 `json:"target_cpu_s"`     // during the window
	BackendCPU     float64 `json:"backend_cpu_s"`
	HarnessCPU     float64 `json:"harness_cpu_s"`
	BackendEchoed  int64   `json:"backend_echoed"` // during the window
	WorkIterations int64   `json:"work_iterations"`

	// Sluice only, whole run: messages held back by limit, and closes.
	SluiceDelayed   map[string]float64 `json:"sluice_delayed,omitempty"`
	SluiceEvictions map[string]float64 `json:"sluice_evictions,omitempty"`
}

// flooders is how many flooders spec runs with.
func (r *runner) flooders(spec targetSpec) int {
	if spec.flooders >= 0 {
		return spec.flooders
	}
	return r.cfg.flooders
}

// maxFlooders is the most flooders any target runs with.
func (r *runner) maxFlooders() int {
	n := 0
	for _, t := range r.cfg.targets {
		n = max(n, r.flooders(t))
	}
	return n
}

// shareSpread is the median of counts and the least and most of them
// relative to it (NaN when there are none or the median is 0).
func shareSpread(counts []int64) (median, lo, hi float64) {
	if len(counts) == 0 {
		return math.NaN(), math.NaN(), math.NaN()
	}
	xs := slices.Clone(counts)
	slices.Sort(xs)
	n := len(xs)
	median = float64(xs[n/2])
	if n%2 == 0 {
		median = float64(xs[n/2-1]+xs[n/2]) / 2
	}
	if median == 0 {
		return median, math.NaN(), math.NaN()
	}
	return median, float64(xs[0]) / median, float64(xs[n-1]) / median
}

// runInbound runs one inbound measurement against spec.
func runInbound(ctx context.Context, r *runner, spec targetSpec) (res inboundResult, err error) {
	cfg := r.cfg
	nFlood := r.flooders(spec)
	res = inboundResult{Target: spec.label, Clients: cfg.clients, Flooders: nFlood}
	parts, err := startRun(ctx, r, spec, 0, 200*time.Millisecond, false)
	if err != nil {
		return res, err
	}
	defer parts.stop()
	be, tg, mon := parts.be, parts.tg, parts.mon

	total := cfg.clients + nFlood
	var counting, stopped atomic.Bool
	var echoes atomic.Int64
	clients := make([]*echoClient, total)
	stop := make(chan struct{})
	var stopOnce sync.Once
	stopSenders := func() { stopOnce.Do(func() { close(stop) }) }
	sending := false // the senders were started
	defer func() {
		// However the run ends: stop the senders, close every connection,
		// wait for both goroutines of each.
		stopSenders()
		stopped.Store(true)
		for _, c := range clients {
			if c != nil {
				c.conn.Close()
				if sending {
					<-c.sendDone
				}
				<-c.readDone
			}
		}
	}()
	_, err = connectAll(ctx, total, cfg.workers, true, func(ctx context.Context, i int) error {
		conn, err := dialWS(ctx, tg.url, i, socketOpts{}, 4096)
		if err != nil {
			return fmt.Errorf("client %d: %w", i, err)
		}
		c := &echoClient{id: uint64(i), flooder: i >= cfg.clients, conn: conn, stopped: &stopped,
			sendDone: make(chan struct{}), readDone: make(chan struct{})}
		if c.flooder {
			c.window = make(chan struct{}, cfg.window)
		}
		clients[i] = c
		go c.inboundReader(&counting, &echoes)
		return nil
	})
	if err != nil {
		return res, err
	}

	// Senders start together; normal clients spread over one interval.
	interval := time.Duration(float64(time.Second) / cfg.rate)
	t0 := time.Now()
	sending = true
	for i, c := range clients {
		go c.inboundSender(t0.Add(interval*time.Duration(i)/time.Duration(max(cfg.clients, 1))), interval, cfg.size, stop)
	}
	if err := sleep(ctx, inboundWarmup); err != nil {
		return res, err
	}

	// The measured window.
	s0, err := be.stats()
	if err != nil {
		return res, err
	}
	prof := r.startProfile(ctx, tg, cfg.duration)
	defer prof.stop()
	start := time.Now()
	t := mon.now(tg.proc)
	res.TargetRSSStart, res.WorkIterations = t.RSS, s0.WorkIterations
	tcpu0, bcpu0, hcpu0 := t.CPU, mon.now(be.process).CPU, selfCPU()
	counting.Store(true)
	if err := measuredWindow(ctx, "inbound", be, tg, cfg.duration); err != nil {
		return res, err
	}
	counting.Store(false)
	res.Duration = time.Since(start).Seconds()
	t = mon.now(tg.proc)
	res.TargetRSSEnd, res.TargetCPU = t.RSS, t.CPU-tcpu0
	res.BackendCPU = mon.now(be.process).CPU - bcpu0
	res.HarnessCPU = selfCPU() - hcpu0
	s1, err := be.stats()
	if err != nil {
		return res, err
	}
	prof.end(ctx)
	res.BackendEchoed = s1.Echoed - s0.Echoed
	res.BackendPerSec = float64(res.BackendEchoed) / res.Duration
	normal := make([]int64, cfg.clients)
	for id, n := range s1.PerClient {
		d := n - s0.PerClient[id]
		switch {
		case id < uint64(cfg.clients):
			normal[id] = d
			res.NormalPerSec += float64(d)
		case id < uint64(total):
			res.FlooderPerSec += float64(d)
		}
	}
	res.NormalPerSec /= res.Duration
	res.FlooderPerSec /= res.Duration
	res.ShareMedian, res.ShareMin, res.ShareMax = shareSpread(normal)

	// Stop sending, then wait for the echoes still due.
	stopSenders()
	for _, c := range clients {
		select {
		case <-c.sendDone:
		case <-time.After(5 * time.Second):
			c.conn.Close() // a write blocked that long ends with the connection
			<-c.sendDone
		}
	}
	drain := time.Now()
	last, lastAt := echoes.Load(), drain
	for time.Since(drain) < drainMax && time.Since(lastAt) < drainIdle && !allAnswered(clients) {
		if err := sleep(ctx, 20*time.Millisecond); err != nil {
			return res, err
		}
		if n := echoes.Load(); n != last {
			last, lastAt = n, time.Now()
		}
	}
	res.Drain = time.Since(drain).Seconds()
	mon.stopMonitor()
	res.TargetPeakRSS = mon.peak(tg.proc)
	if tg.admin != "" {
		ms, err := scrapeMetrics(tg.admin, 3*time.Second)
		if err != nil {
			return res, err
		}
		res.SluiceDelayed = ms.byLabel("sluice_messages_delayed_total", "limit")
		res.SluiceEvictions = ms.byLabel("sluice_evictions_total", "reason")
	}

	stopped.Store(true)
	var lat latency.Histogram
	res.NormalEnded, res.FloodEnded = map[string]int{}, map[string]int{}
	for _, c := range clients {
		c.conn.Close()
		<-c.readDone
		lost := c.sent.Load() - c.echoed.Load()
		res.Gaps += c.seq.gaps
		res.Disorder += c.seq.disorder
		if c.flooder {
			res.FlooderSent += c.sent.Load()
			res.FlooderLost += lost
			if c.ended != "" {
				res.FloodEnded[c.ended]++
			}
			continue
		}
		res.NormalSent += c.sent.Load()
		res.NormalLost += lost
		res.NormalEchoes += c.inWin
		lat.Merge(&c.lat)
		if c.ended != "" {
			res.NormalEnded[c.ended]++
		}
	}
	res.NormalP50, res.NormalP99, res.NormalMax = quantileMs(&lat, 0.50), quantileMs(&lat, 0.99), maxMs(&lat)
	return res, nil
}

// allAnswered reports whether every client has had every message echoed
// (or its connection ended, after which nothing more will come).
func allAnswered(clients []*echoClient) bool {
	for _, c := range clients {
		if c.echoed.Load() < c.sent.Load() && !isClosed(c.readDone) {
			return false
		}
	}
	return true
}

// isClosed reports whether ch is closed.
func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
