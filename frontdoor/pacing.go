package frontdoor

// Upgrade pacing toward the backend (Options.UpstreamMaxHandshakes,
// Options.UpstreamHandshakesPerSecond). When a backend restarts, every
// client reconnects at once; refusing the excess only makes clients come
// back again, so an upgrade over the limits waits its turn instead, its
// client socket held and nothing read past its request, in a bounded
// queue that is fair across client addresses: one address with a
// thousand waiting upgrades is served in turn with each other address,
// not before them. Only past Options.UpstreamQueueTimeout, or when the
// queue is full, or when sluice shuts down, is an upgrade refused (503
// with Retry-After).
//
// A turn is held from the upstream dial to the upstream's 101 or failure:
// established sessions hold none, so the limit bounds upgrades in
// progress, not sessions (unlike HAProxy's server maxconn, which a
// tunnel holds for its life). The rate spaces turns evenly, a burst of
// one: at 500/s and 20 ms per upgrade, about 10 are in flight.

import (
	"errors"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Why an upgrade got no turn.
var (
	errPacingTimeout  = errors.New("frontdoor: upstream handshake queue timeout")
	errPacingFull     = errors.New("frontdoor: upstream handshake queue full")
	errPacingDraining = errors.New("frontdoor: draining")
)

// defaultPacingQueue bounds the queue when MaxConnections does not.
const defaultPacingQueue = 10_000

// waiter is one upgrade waiting for its turn. granted is closed (or
// err set and granted closed) by the pacer, under its mu.
type waiter struct {
	key     netip.Addr
	granted chan struct{}
	err     error // why no turn; guarded by the pacer's mu, read after granted is closed
	done    bool  // granted or refused; guarded by the pacer's mu
}

// handshakeQueue is the waiting upgrades: a FIFO per client address, and
// the addresses with waiters served round-robin. Not safe for concurrent
// use: the pacer's mu guards it.
type handshakeQueue struct {
	bound int
	n     int
	byKey map[netip.Addr][]*waiter
	ring  []netip.Addr // addresses with waiters, the next to serve first
}

func newHandshakeQueue(bound int) *handshakeQueue {
	return &handshakeQueue{bound: bound, byKey: make(map[netip.Addr][]*waiter)}
}

func (q *handshakeQueue) len() int { return q.n }

// push queues w behind the other waiters of its address, unless the
// queue is full.
func (q *handshakeQueue) push(w *waiter) bool {
	if q.n >= q.bound {
		return false
	}
	ws, ok := q.byKey[w.key]
	if !ok {
		q.ring = append(q.ring, w.key)
	}
	q.byKey[w.key] = append(ws, w)
	q.n++
	return true
}

// pop takes the first waiter of the next address in turn, or nil.
func (q *handshakeQueue) pop() *waiter {
	if q.n == 0 {
		return nil
	}
	key := q.ring[0]
	q.ring = q.ring[1:]
	ws := q.byKey[key]
	w := ws[0]
	ws[0] = nil
	if ws = ws[1:]; len(ws) > 0 {
		q.byKey[key] = ws
		q.ring = append(q.ring, key) // its next waiter comes after every other address's
	} else {
		delete(q.byKey, key)
	}
	q.n--
	if len(q.ring) == 0 {
		q.ring = nil // let the backing array go once the storm is over
	}
	return w
}

// remove takes w out of the queue, wherever it is (a timed-out waiter).
func (q *handshakeQueue) remove(w *waiter) bool {
	ws := q.byKey[w.key]
	for i, x := range ws {
		if x != w {
			continue
		}
		ws = append(ws[:i], ws[i+1:]...)
		q.n--
		if len(ws) > 0 {
			q.byKey[w.key] = ws
			return true
		}
		delete(q.byKey, w.key)
		for j, k := range q.ring {
			if k == w.key {
				q.ring = append(q.ring[:j], q.ring[j+1:]...)
				break
			}
		}
		return true
	}
	return false
}

// PacingMetrics are the pacer's series, registered whether or not pacing
// is on, so that dashboards show 0 rather than nothing.
type PacingMetrics struct {
	queued   prometheus.Gauge
	inFlight prometheus.Gauge
	wait     prometheus.Histogram
}

// NewPacingMetrics makes the pacer's series, registered into reg unless
// it is nil.
func NewPacingMetrics(reg prometheus.Registerer) *PacingMetrics {
	m := &PacingMetrics{
		queued: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sluice_upstream_handshake_queue_length", Help: "Upgrades waiting for their turn toward the backend (upgrade pacing).",
		}),
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sluice_upstream_handshakes_in_flight", Help: "Upgrades toward the backend under way now, from the dial to the upstream's answer (counted with upgrade pacing on).",
		}),
		wait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "sluice_upstream_handshake_wait_seconds", Help: "Time an upgrade waited for its turn toward the backend, refused ones included (upgrade pacing).",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 9),
		}),
	}
	if reg != nil {
		reg.MustRegister(m.queued, m.inFlight, m.wait)
	}
	return m
}

// PacingConfig is upgrade pacing's part of Options.
type PacingConfig struct {
	MaxHandshakes       int // Options.UpstreamMaxHandshakes; 0: no bound
	HandshakesPerSecond int // Options.UpstreamHandshakesPerSecond; 0: no rate
	// Queue bounds the upgrades waiting; 0: MaxConnections, or 10,000
	// without one.
	Queue          int
	MaxConnections int
	QueueTimeout   time.Duration // the longest wait for a turn
	// AnswerTimeout bounds the write of a refusal after a wait
	// (Options.HandshakeTimeout).
	AnswerTimeout time.Duration
	// Rejected is sluice_connections_rejected_total, by reason.
	Rejected *prometheus.CounterVec
}

// Pacer gives upgrades their turns toward the backend.
type Pacer struct {
	max      int           // turns at once; 0: no bound
	interval time.Duration // between turns' starts; 0: no rate
	timeout  time.Duration // the longest wait for a turn
	answer   time.Duration // PacingConfig.AnswerTimeout
	rejected *prometheus.CounterVec
	metrics  *PacingMetrics

	mu       sync.Mutex
	q        *handshakeQueue // guarded by mu
	inFlight int             // guarded by mu
	due      time.Time       // earliest start of the next turn under the rate; guarded by mu
	timer    *time.Timer     // wakes dispatch when the rate holds the queue; guarded by mu
	ticking  bool            // timer is set; guarded by mu
	closed   bool            // draining: no more turns; guarded by mu
}

// NewPacer is the pacer of o, or nil when o sets no pacing.
func NewPacer(o PacingConfig, m *PacingMetrics) *Pacer {
	if o.MaxHandshakes <= 0 && o.HandshakesPerSecond <= 0 {
		return nil
	}
	bound := o.Queue
	if bound <= 0 {
		// Each queued upgrade already holds a connection under
		// MaxConnections; without one, a fixed bound.
		bound = o.MaxConnections
		if bound <= 0 {
			bound = defaultPacingQueue
		}
	}
	p := &Pacer{
		max: o.MaxHandshakes, timeout: o.QueueTimeout, answer: o.AnswerTimeout,
		rejected: o.Rejected, metrics: m, q: newHandshakeQueue(bound),
	}
	if o.HandshakesPerSecond > 0 {
		p.interval = max(time.Second/time.Duration(o.HandshakesPerSecond), 1)
	}
	return p
}

// free reports whether a turn may start at now; the caller holds mu.
func (p *Pacer) free(now time.Time) bool {
	return (p.max <= 0 || p.inFlight < p.max) && (p.interval == 0 || !now.Before(p.due))
}

// start counts a turn starting at now; the caller holds mu.
func (p *Pacer) start(now time.Time) {
	p.inFlight++
	p.metrics.inFlight.Set(float64(p.inFlight))
	if p.interval > 0 {
		// A burst of one: after a quiet spell, the next turn is one
		// interval after this one, not a bucketful at once.
		if p.due.Before(now) {
			p.due = now
		}
		p.due = p.due.Add(p.interval)
	}
}

// wait blocks until the upgrade of a client whose fairness key is key has
// its turn, and returns nil, or the reason it has none. A nil error
// obliges the caller to call finish.
func (p *Pacer) wait(key netip.Addr) (queued bool, err error) {
	began := time.Now()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return false, errPacingDraining
	}
	if p.q.len() == 0 && p.free(began) {
		p.start(began)
		p.mu.Unlock()
		p.metrics.wait.Observe(0)
		return false, nil
	}
	w := &waiter{key: key, granted: make(chan struct{})}
	if !p.q.push(w) {
		p.mu.Unlock()
		p.metrics.wait.Observe(0)
		return false, errPacingFull
	}
	p.metrics.queued.Set(float64(p.q.len()))
	p.dispatch(began) // a rate-held queue needs its timer
	p.mu.Unlock()

	t := time.NewTimer(p.timeout)
	select {
	case <-w.granted:
	case <-t.C:
	}
	t.Stop()
	p.mu.Lock()
	if !w.done {
		w.done, w.err = true, errPacingTimeout
		p.q.remove(w)
		p.metrics.queued.Set(float64(p.q.len()))
	}
	err = w.err
	p.mu.Unlock()
	p.metrics.wait.Observe(time.Since(began).Seconds())
	return true, err
}

// finish ends a turn: the upstream answered, or failed.
func (p *Pacer) finish() {
	p.mu.Lock()
	p.inFlight--
	p.metrics.inFlight.Set(float64(p.inFlight))
	p.dispatch(time.Now())
	p.mu.Unlock()
}

// dispatch starts the turns now due; the caller holds mu. When only the
// rate holds the queue back, a timer calls it again when the next turn
// is due.
func (p *Pacer) dispatch(now time.Time) {
	for p.q.len() > 0 && !p.closed {
		if !p.free(now) {
			if p.interval > 0 && now.Before(p.due) && (p.max <= 0 || p.inFlight < p.max) && !p.ticking {
				p.ticking = true
				if p.timer == nil {
					p.timer = time.AfterFunc(p.due.Sub(now), p.tick)
				} else {
					p.timer.Reset(p.due.Sub(now))
				}
			}
			break
		}
		w := p.q.pop()
		p.start(now)
		w.done = true
		close(w.granted)
	}
	p.metrics.queued.Set(float64(p.q.len()))
}

func (p *Pacer) tick() {
	p.mu.Lock()
	p.ticking = false
	p.dispatch(time.Now())
	p.mu.Unlock()
}

// Close refuses every waiting upgrade and every later one: sluice is
// shutting down, and a queued client should hear so now, not at its
// timeout. A nil pacer has none.
func (p *Pacer) Close() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for w := p.q.pop(); w != nil; w = p.q.pop() {
		w.done, w.err = true, errPacingDraining
		close(w.granted)
	}
	if p.timer != nil {
		p.timer.Stop()
	}
	p.metrics.queued.Set(0)
}

// Counts are the turns under way and the upgrades waiting, for status
// pages; 0, 0 for a nil pacer.
func (p *Pacer) Counts() (inFlight, queued int) {
	if p == nil {
		return 0, 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.inFlight, p.q.len()
}

// Turn is an upgrade's turn toward the backend; its zero value holds
// none.
type Turn struct{ p *Pacer }

// End gives the turn back; it may be called again (a deferred call after
// a panic), and does nothing then.
func (t *Turn) End() {
	if t.p != nil {
		t.p.finish()
		t.p = nil
	}
}

// TakeTurn waits, with pacing on (p not nil), for the upgrade of cl on c
// to have its turn toward the backend. When it gets none, it has answered
// c with 503 and Retry-After, and ok is false.
func (p *Pacer) TakeTurn(c net.Conn, cl Client) (t Turn, ok bool) {
	if p == nil {
		return Turn{}, true
	}
	queued, err := p.wait(ClientKey(cl.Addr))
	if err == nil {
		t = Turn{p: p}
		if queued && clientGone(c) {
			// It gave up while it waited (a storm's clients retry): its
			// turn goes to the next, and the backend never sees it.
			t.End()
			p.rejected.WithLabelValues("client_gone").Inc()
			return Turn{}, false
		}
		return t, true
	}
	// The wait may have outlasted the handshake's write deadline.
	c.SetWriteDeadline(time.Now().Add(p.answer))
	switch err {
	case errPacingDraining:
		refuse(c, p.rejected, http.StatusServiceUnavailable, "draining", "sluice is shutting down", RetryAfter())
	case errPacingFull:
		refuse(c, p.rejected, http.StatusServiceUnavailable, "upstream_queue_full", "too many upgrades waiting for the backend, retry later", RetryAfter())
	default:
		refuse(c, p.rejected, http.StatusServiceUnavailable, "upstream_queue_timeout", "the backend is busy with other upgrades, retry later", RetryAfter())
	}
	return Turn{}, false
}

// clientGone reports whether c's peer has closed or reset it, without
// reading anything it sent: one non-blocking MSG_PEEK. A connection sluice
// cannot ask (TLS over a wrapper without a descriptor) is taken as there.
func clientGone(c net.Conn) bool {
	if nc, ok := c.(interface{ NetConn() net.Conn }); ok {
		c = nc.NetConn()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	gone := false
	var b [1]byte
	raw.Read(func(fd uintptr) bool {
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		gone = n == 0 && err == nil || err != nil && err != syscall.EAGAIN && err != syscall.EINTR
		return true // never wait: this is a look, not a read
	})
	return gone
}
