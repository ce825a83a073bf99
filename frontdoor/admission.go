package frontdoor

// Admission control: who may open a session, how many at once and how
// fast, decided before anything is dialled. Who the client is comes from
// clientaddr.go, which origins may connect from origin.go; the server
// calls Arrive at accept, Admit once the request is read, and Leave when
// the session ends.
//
// A connection counts from its accept, while its request is still
// arriving, to the end of its session: a flood of partial requests holds
// no more goroutines and buffers than the limits allow. So, in this order:
//
//  1. At accept (Admission.Arrive), Options.MaxConnections: 503 with
//     Retry-After; then Options.MaxConnectionsPerIP by the socket peer,
//     unless it is a trusted proxy: 429 with Retry-After. Over TLS the
//     connection is closed without a word (an answer would cost a TLS
//     handshake).
//
// Then, once the request has been read and found to be a WebSocket
// upgrade, and sluice is not draining (Admission.Admit):
//
//  2. Origin: with Options.AllowedOrigins set, a request whose Origin
//     header matches no entry gets 403. A request without Origin (not a
//     browser) passes: cross-site WebSocket hijacking needs a browser, and
//     browsers always send Origin with a WebSocket handshake.
//  3. Options.MaxConnectionsPerIP by the client a trusted proxy names:
//     429 with Retry-After.
//  4. Options.MaxHandshakesPerSecond: 503 with Retry-After.
//
// A request refused by one check frees what the earlier ones counted, and
// does not count against the later ones: a 403 takes no token. Retry-After
// is 1 to 5 seconds, at random, so that clients refused together do not
// come back together.

import (
	"crypto/tls"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// refusal is how admission control answers a request it turns away.
type refusal struct {
	reason string // label of sluice_connections_rejected_total
	status int
	retry  bool // send Retry-After
	msg    string
}

// Indexes of refusals.
const (
	refuseOrigin = iota
	refuseMaxConns
	refusePerIP
	refuseRate
)

var refusals = [...]refusal{
	refuseOrigin:   {"origin", http.StatusForbidden, false, "origin not allowed"},
	refuseMaxConns: {"max_connections", http.StatusServiceUnavailable, true, "sluice is at its connection limit, retry later"},
	refusePerIP:    {"max_connections_per_ip", http.StatusTooManyRequests, true, "too many connections from your address"},
	refuseRate:     {"rate_limit", http.StatusServiceUnavailable, true, "too many new connections, retry later"},
}

// AdmissionReasons are the labels of sluice_connections_rejected_total
// that admission control counts under.
func AdmissionReasons() []string {
	out := make([]string, 0, len(refusals))
	for _, r := range refusals {
		out = append(out, r.reason)
	}
	return out
}

// AdmissionConfig is what admission control is given: the limits of
// Options, and where refusals are counted and logged.
type AdmissionConfig struct {
	MaxConnections         int // 0: no bound
	MaxConnectionsPerIP    int // 0: no bound
	MaxHandshakesPerSecond int // 0: no bound
	TrustedProxies         []netip.Prefix
	AllowedOrigins         []string // empty: any origin
	// Rejected is sluice_connections_rejected_total, by reason.
	Rejected *prometheus.CounterVec
	Log      zerolog.Logger // one line a second per reason at most
}

// Admission holds the limits of one server and what counts against them.
// Everything but the counters is immutable after NewAdmission.
type Admission struct {
	began    time.Time
	rejected *prometheus.CounterVec
	log      zerolog.Logger
	maxConns int64 // 0: no bound
	perIP    int   // 0: no bound
	trusted  []netip.Prefix
	origins  Origins      // empty: any origin
	bucket   *tokenBucket // nil: no rate limit

	// conns counts admitted connections, from the handshake to the end of
	// the session; kept only when maxConns > 0.
	conns atomic.Int64

	mu   sync.Mutex
	byIP map[netip.Addr]int // admitted connections per ClientKey; guarded by mu; nil when perIP == 0

	logs [len(refusals)]RejectLog
}

// NewAdmission returns admission control for o; it fails on an entry of
// AllowedOrigins that CheckOriginPattern rejects.
func NewAdmission(o AdmissionConfig) (*Admission, error) {
	a := &Admission{
		began:    time.Now(),
		rejected: o.Rejected,
		log:      o.Log,
		maxConns: int64(o.MaxConnections),
		perIP:    o.MaxConnectionsPerIP,
	}
	origins, err := ParseOrigins(o.AllowedOrigins)
	if err != nil {
		return nil, err
	}
	a.origins = origins
	for _, p := range o.TrustedProxies {
		a.trusted = append(a.trusted, NormalizePrefix(p))
	}
	if a.perIP > 0 {
		a.byIP = make(map[netip.Addr]int)
	}
	if o.MaxHandshakesPerSecond > 0 {
		a.bucket = newTokenBucket(o.MaxHandshakesPerSecond, o.MaxHandshakesPerSecond)
	}
	return a, nil
}

// Slot is a connection's place under the limits, from its accept. The
// handshake owns it until HandOff passes it to the session, whose end
// frees it (the server calls Admission.Leave with the same client
// address).
type Slot struct {
	a    *Admission
	key  netip.Addr // counted per IP under this key; invalid: not (yet) counted per IP
	held bool
}

// Release frees the slot unless a session has taken it over.
func (t *Slot) Release() {
	if t.held {
		t.held = false
		t.a.free(t.key)
	}
}

// HandOff gives the slot to the session about to start.
func (t *Slot) HandOff() { t.held = false }

// Arrive counts the connection c from r.RemoteAddr, just accepted,
// against MaxConnections, and against MaxConnectionsPerIP unless its peer
// is a trusted proxy (Admit counts the client it names). When a limit
// refuses, it has answered c (plain connections only) and ok is false.
func (a *Admission) Arrive(c net.Conn, r *Request) (t Slot, ok bool) {
	if a.maxConns > 0 && a.conns.Add(1) > a.maxConns {
		a.conns.Add(-1)
		a.refuseArrival(c, r, refuseMaxConns)
		return Slot{}, false
	}
	t = Slot{a: a, held: true}
	if a.perIP > 0 {
		key := ClientKey(r.RemoteAddr)
		peer, _ := netip.ParseAddrPort(r.RemoteAddr)
		if key.IsValid() && !TrustedAddr(a.trusted, peer.Addr().Unmap()) {
			if !a.countIP(key) {
				if a.maxConns > 0 {
					a.conns.Add(-1)
				}
				a.refuseArrival(c, r, refusePerIP)
				return Slot{}, false
			}
			t.key = key
		}
	}
	return t, true
}

// refuseArrival answers a connection refused before its request is read:
// half-closed after the answer, so that the client reads it rather than a
// reset, as net/http ends a refusal sent before the request was read.
func (a *Admission) refuseArrival(c net.Conn, r *Request, i int) {
	if _, isTLS := c.(*tls.Conn); isTLS {
		a.refuseSilently(r, i)
		return
	}
	a.refuse(c, r, i, Client{Addr: r.RemoteAddr})
	CloseWriteAndWait(c)
}

// countIP counts one more connection for key, unless it is at the bound.
func (a *Admission) countIP(key netip.Addr) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := a.byIP[key]
	if n >= a.perIP {
		return false
	}
	a.byIP[key] = n + 1
	return true
}

// Admit runs the checks that need the request r from cl, on the slot t
// that Arrive gave its connection. When one refuses, it has answered the
// request on c and ok is false; the caller still releases t.
func (a *Admission) Admit(c net.Conn, r *Request, cl Client, t *Slot) (ok bool) {
	if len(a.origins) > 0 && r.Has("Origin") {
		if o, one := r.One("Origin"); !one || !a.origins.Allowed(o) {
			a.refuse(c, r, refuseOrigin, cl)
			return false
		}
	}
	if a.perIP > 0 && !t.key.IsValid() {
		// The peer is a trusted proxy (or has no IP): count the client it
		// forwards for, as the session's end will free it.
		if key := ClientKey(cl.Addr); key.IsValid() {
			if !a.countIP(key) {
				a.refuse(c, r, refusePerIP, cl)
				return false
			}
			t.key = key
		}
	}
	if a.bucket != nil && !a.bucket.allow() {
		a.refuse(c, r, refuseRate, cl)
		return false
	}
	return true
}

// free gives back what admit counted for key.
func (a *Admission) free(key netip.Addr) {
	if a.maxConns > 0 {
		a.conns.Add(-1)
	}
	if a.perIP > 0 && key.IsValid() {
		a.mu.Lock()
		if n := a.byIP[key] - 1; n > 0 {
			a.byIP[key] = n
		} else {
			delete(a.byIP, key)
		}
		a.mu.Unlock()
	}
}

// ClientOf is who r comes from: the peer, or whom a trusted proxy's
// headers name (ResolveClient).
func (a *Admission) ClientOf(r *Request) Client {
	if len(a.trusted) == 0 {
		return Client{Addr: r.RemoteAddr}
	}
	return ResolveClient(a.trusted, r.RemoteAddr, r)
}

// Leave frees the slot of a finished session whose client address is
// addr (the Client.Addr it was admitted as).
func (a *Admission) Leave(addr string) {
	switch {
	case a.perIP > 0:
		a.free(ClientKey(addr))
	case a.maxConns > 0:
		a.free(netip.Addr{}) // the key matters only to the per-IP count
	}
}

// refuse answers r for refusal i: counted, short text body, Retry-After
// where the client may simply try again, and a log line at most once a
// second per reason. The line comes first: once the answer is written,
// the client's next request may be refused before this one is noted.
func (a *Admission) refuse(c net.Conn, r *Request, i int, cl Client) {
	rf := &refusals[i]
	retry := 0
	if rf.retry {
		retry = RetryAfter()
	}
	defer WriteError(c, rf.status, rf.msg, retry)
	a.noteRefusal(r, i, cl)
}

// refuseSilently counts and logs refusal i, answered by closing.
func (a *Admission) refuseSilently(r *Request, i int) {
	a.noteRefusal(r, i, Client{Addr: r.RemoteAddr})
}

// noteRefusal counts refusal i and logs it, at most once a second.
func (a *Admission) noteRefusal(r *Request, i int, cl Client) {
	rf := &refusals[i]
	a.rejected.WithLabelValues(rf.reason).Inc()
	n, ok := a.logs[i].Note(time.Since(a.began))
	if !ok {
		return
	}
	ev := a.log.Warn().Str("reason", rf.reason).Str("client", cl.Addr).Uint64("rejected", n)
	if i == refuseOrigin {
		o := ""
		if vs := r.Values("Origin"); len(vs) > 0 {
			o = vs[0]
		}
		if len(o) > 256 {
			o = o[:256]
		}
		ev = ev.Str("origin", o)
	}
	ev.Msg("upgrades rejected")
}

// Began is when a was made: the epoch of its RejectLogs, and of others'
// that share it.
func (a *Admission) Began() time.Time { return a.began }

// Connections are the connections counted against MaxConnections now,
// from their accept to the end of their session (0 without the bound).
func (a *Admission) Connections() int64 { return a.conns.Load() }

// ConnectionsFrom are the connections counted against
// MaxConnectionsPerIP now for addr's key (ClientKey); 0 without the
// bound.
func (a *Admission) ConnectionsFrom(addr string) int {
	if a.perIP <= 0 {
		return 0
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.byIP[ClientKey(addr)]
}

// Trusted are Options.TrustedProxies, normalized.
func (a *Admission) Trusted() []netip.Prefix { return a.trusted }

// RetryAfter is a Retry-After in whole seconds, 1 to 5 at random.
func RetryAfter() int { return 1 + rand.IntN(5) }

// RejectLog keeps refusals of one reason to at most one log line a
// second: a burst of thousands must not flood the log. The line carries
// the number of refusals since the previous one. The zero value is ready.
type RejectLog struct {
	next    atomic.Int64  // earliest time of the next line, as ns since the caller's epoch
	pending atomic.Uint64 // refusals not yet reported in a line
}

// Note counts one refusal at now, the time since an epoch the caller
// keeps fixed, and reports whether to log a line, and how many refusals
// it stands for.
func (l *RejectLog) Note(now time.Duration) (n uint64, log bool) {
	l.pending.Add(1)
	next := l.next.Load()
	if int64(now) < next || !l.next.CompareAndSwap(next, int64(now+time.Second)) {
		return 0, false
	}
	return l.pending.Swap(0), true
}

// tokenBucket limits a rate with bursts, as the generic cell rate
// algorithm: one atomic word, the theoretical arrival time of the next
// token, stands for the bucket's level, so allow never locks.
type tokenBucket struct {
	began    time.Time
	interval int64 // ns between tokens
	slack    int64 // (burst-1)·interval: how far tat may run ahead of now
	tat      atomic.Int64
}

// newTokenBucket allows perSecond events a second on average and up to
// burst at once (both at least 1).
func newTokenBucket(perSecond, burst int) *tokenBucket {
	perSecond, burst = max(perSecond, 1), max(burst, 1)
	interval := max(int64(time.Second)/int64(perSecond), 1)
	return &tokenBucket{began: time.Now(), interval: interval, slack: int64(burst-1) * interval}
}

// allow takes a token if there is one.
func (b *tokenBucket) allow() bool {
	now := int64(time.Since(b.began))
	for {
		tat := b.tat.Load()
		t := max(tat, now)
		if t-now > b.slack {
			return false
		}
		if b.tat.CompareAndSwap(tat, t+b.interval) {
			return true
		}
	}
}
