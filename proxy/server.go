// Package proxy splices WebSocket connections: each client connection is
// paired with one upstream connection, and frames flow both ways through
// bounded queues; each socket is written only through its leg's writer
// (legWriter, write.go), by whoever holds its write token.
//
// It holds the Server (server.go: registry, drain, status; accept.go: the
// accept loop, which takes each connection through package frontdoor's
// checks, dial and answers and hands the upgraded pair to a session;
// metrics.go, options.go) and the pair of legs: session.go, read.go,
// write.go, close.go and endings.go, with what they need (ratelimit.go,
// idle_linux.go, settle.go, panic.go); sockets are tuned by internal/sockopt.
package proxy

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/frontdoor"
	"github.com/sluice-proxy/sluice/internal/sockopt"
	"github.com/sluice-proxy/sluice/limiter"
)

// Server accepts WebSocket upgrades and proxies each to the upstream. It
// runs its own accept loop (accept.go): no net/http state lives for a
// connection, before its upgrade or after.
type Server struct {
	opts    Options
	log     zerolog.Logger
	metrics *Metrics
	budget  *limiter.Budget
	adm     *frontdoor.Admission     // connection limits, origins, handshake rate
	dialer  frontdoor.UpstreamDialer // every upgrade's dial toward the backend
	idle    *idlePoller              // parked readers of idle sockets; nil: readers wait in goroutines
	fair    *limiter.Fair            // Options.UpstreamMaxMessagesPerSecond; nil: no cap
	settle  *setupGC                 // collects once a burst of setups is over (settle.go)
	pass    *frontdoor.PassThrough   // Options.HTTPPassThrough; nil: plain requests get 426
	pacer   *frontdoor.Pacer         // upgrade pacing toward the backend; nil: off
	pp      *frontdoor.ProxyProtocol // PROXY headers (Options.ProxyProtocol)
	// upstreamQueue bounds every upstream leg's queue (session.go's
	// upstreamQueue, PauseMax from Options.UpstreamWriteTimeout).
	upstreamQueue limiter.Config

	nextID   atomic.Uint64
	draining atomic.Bool // readiness fails: BeginDrain or Shutdown was called
	closing  atomic.Bool // new upgrades are refused: Shutdown was called; set under mu
	// lastUpstreamOK is the unix nanotime of the last successful upstream
	// TCP connect, for readiness.
	lastUpstreamOK atomic.Int64

	dialFailLog frontdoor.RejectLog // upstream dial failures, logged at most once a second

	mu        sync.Mutex
	listeners map[net.Listener]struct{} // Serve's, closed by Shutdown; guarded by mu
	sessions  map[*session]struct{}     // guarded by mu
	// handshakes are the connections accepted and not yet a session (nor
	// refused), for Shutdown to wait for or cut off; guarded by mu.
	handshakes map[net.Conn]struct{}
	evictions  evictionLog // guarded by mu
	// sessionGone hears from forget when a session ends, for Shutdown.
	sessionGone chan struct{}
	stop        context.CancelFunc
	guardWG     sync.WaitGroup
}

// New returns a Server for opts. Call Serve to accept connections and
// Shutdown to drain them.
func New(opts Options) (*Server, error) {
	if err := opts.setDefaults(); err != nil {
		return nil, err
	}
	metrics := newMetrics(opts.Registerer)
	adm, err := frontdoor.NewAdmission(frontdoor.AdmissionConfig{
		MaxConnections: opts.MaxConnections, MaxConnectionsPerIP: opts.MaxConnectionsPerIP,
		MaxHandshakesPerSecond: opts.MaxHandshakesPerSecond, TrustedProxies: opts.TrustedProxies,
		AllowedOrigins: opts.AllowedOrigins, Rejected: metrics.rejected, Log: opts.Logger,
	})
	if err != nil {
		return nil, fmt.Errorf("proxy: Options.AllowedOrigins: %w", err)
	}
	s := &Server{
		opts:        opts,
		log:         opts.Logger,
		metrics:     metrics,
		adm:         adm,
		pp:          frontdoor.NewProxyProtocol(adm.Trusted(), opts.HandshakeTimeout, metrics.rejected, opts.Logger),
		listeners:   make(map[net.Listener]struct{}),
		sessions:    make(map[*session]struct{}),
		handshakes:  make(map[net.Conn]struct{}),
		sessionGone: make(chan struct{}, 1),
	}
	s.settle = newSetupGC(s.Sessions)
	s.upstreamQueue = upstreamQueue
	s.upstreamQueue.PauseMax = opts.UpstreamWriteTimeout
	s.pacer = frontdoor.NewPacer(frontdoor.PacingConfig{
		MaxHandshakes: opts.UpstreamMaxHandshakes, HandshakesPerSecond: opts.UpstreamHandshakesPerSecond,
		Queue: opts.UpstreamHandshakeQueue, MaxConnections: opts.MaxConnections,
		QueueTimeout: opts.UpstreamQueueTimeout, AnswerTimeout: opts.HandshakeTimeout, Rejected: metrics.rejected,
	}, frontdoor.NewPacingMetrics(opts.Registerer))
	bc := opts.Budget
	if bc.ObserveWait == nil {
		bc.ObserveWait = func(d time.Duration) { s.metrics.queueWaitSeconds.Observe(d.Seconds()) }
	}
	s.budget = limiter.NewBudget(bc)
	if opts.UpstreamMaxMessagesPerSecond > 0 {
		s.fair = limiter.NewFair(opts.UpstreamMaxMessagesPerSecond, 0)
	}
	s.metrics.registerThrottled(opts.Registerer, func() float64 { return float64(s.ThrottledClients()) })
	if !opts.NoIdlePoll {
		// Without it sessions still work, at a goroutine stack per idle
		// socket: worth a warning, not a refusal.
		if s.idle, err = newIdlePoller(); err != nil {
			s.log.Warn().Err(err).Msg("idle readers will wait in goroutines")
		}
	}
	// No TCP keepalive: sluice pings at the WebSocket layer, and the
	// kernel's probes cost four setsockopt calls per connection.
	d := net.Dialer{KeepAlive: -1}
	if opts.UpstreamReadBuffer > 0 || opts.UpstreamWriteBuffer > 0 {
		d.Control = sockopt.DialBuffers(opts.UpstreamReadBuffer, opts.UpstreamWriteBuffer)
	}
	s.dialer = frontdoor.UpstreamDialer{
		Timeout: opts.DialTimeout, Host: opts.Upstream.Host, TLS: opts.UpstreamTLS,
		Policy: opts.Queue.Policy, NetDial: d.DialContext, LastConnect: &s.lastUpstreamOK,
	}
	if opts.HTTPPassThrough {
		s.pass = frontdoor.NewPassThrough(frontdoor.PassThroughConfig{
			Upstream: opts.Upstream, TLS: opts.UpstreamTLS, DialTimeout: opts.DialTimeout,
			ResponseTimeout: opts.HTTPResponseTimeout, HandshakeTimeout: opts.HandshakeTimeout,
			MaxHeaderBytes: opts.MaxHeaderBytes, Log: s.log, Admission: adm, Upgrades: s,
			Rejected: metrics.rejected, Requests: metrics.httpRequests, Seconds: metrics.httpSeconds,
		})
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.stop = cancel
	s.guardWG.Add(1)
	go func() {
		defer s.guardWG.Done()
		s.budget.Guard(ctx)
	}()
	return s, nil
}

// Budget exposes the global queue accounting, for metrics and status pages.
func (s *Server) Budget() *limiter.Budget { return s.budget }

// Sessions is the number of live proxied sessions.
func (s *Server) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

// Draining reports whether a drain has begun: readiness should fail so
// load balancers stop sending new clients.
func (s *Server) Draining() bool { return s.draining.Load() }

// BeginDrain makes Draining true while new upgrades are still served, so
// a load balancer can notice before Shutdown starts refusing them.
func (s *Server) BeginDrain() { s.draining.Store(true) }

// LastUpstreamConnect is when the upstream last accepted a TCP connection.
func (s *Server) LastUpstreamConnect() time.Time {
	n := s.lastUpstreamOK.Load()
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

// Shutdown stops accepting, sends 1001 Going Away to every client and its
// upstream after their queued data — spread over Options.DrainSpread so
// clients do not all reconnect at once — and waits for the sessions to
// finish their close handshakes. When ctx ends first, the rest are cut off
// and ctx's error is returned.
func (s *Server) Shutdown(ctx context.Context) error {
	s.draining.Store(true)
	s.settle.stop()
	s.mu.Lock()
	s.closing.Store(true)
	for ln := range s.listeners {
		ln.Close()
	}
	s.mu.Unlock()
	s.pacer.Close() // queued upgrades hear 503 now, not at their timeout
	// Pass-through connections: idle ones close now, requests under way
	// may finish while the sessions drain, until ctx ends.
	passDone := make(chan struct{})
	go func() {
		defer close(passDone)
		if s.pass != nil {
			s.pass.Shutdown(ctx)
		}
	}()
	defer func() { <-passDone }()
	// Handshakes under way end within their timeouts: those that reach
	// admission now are refused with 503, the others become sessions,
	// which the loop below or startSession itself sends away.
	err := s.waitHandshakes(ctx)
	if err != nil {
		// Out of time: cut off the handshakes left, outside the lock.
		s.mu.Lock()
		left := make([]net.Conn, 0, len(s.handshakes))
		for c := range s.handshakes {
			left = append(left, c)
		}
		s.mu.Unlock()
		for _, c := range left {
			c.Close()
		}
	}
	live := s.liveSessions()
	var gap time.Duration
	if len(live) > 1 {
		gap = s.opts.DrainSpread / time.Duration(len(live)-1)
	}
	for i, ss := range live {
		if i > 0 && gap > 0 {
			t := time.NewTimer(gap)
			select {
			case <-t.C:
			case <-ctx.Done():
			}
			t.Stop()
		}
		ss.goAway()
	}
	if werr := s.waitSessions(ctx); werr != nil {
		// Aborting closes sockets: not under the server's lock.
		for _, ss := range s.liveSessions() {
			ss.abort(noteShutdownTimeout)
		}
		s.waitSessions(context.Background())
		if err == nil {
			err = werr
		}
	}
	s.stop()
	s.guardWG.Wait()
	s.idle.close()
	return err
}

// UpstreamHandshakes are the upgrades under way toward the backend and
// those waiting for their turn, with upgrade pacing on (0, 0 without).
func (s *Server) UpstreamHandshakes() (inFlight, queued int) { return s.pacer.Counts() }

// ThrottledClients counts the clients held back by an inbound limit
// within the last second, for gauges and status pages.
func (s *Server) ThrottledClients() int {
	if !s.opts.ClientRate.enabled() && s.fair == nil {
		return 0
	}
	now := limiter.Now()
	n := 0
	s.mu.Lock()
	for ss := range s.sessions {
		if r := ss.rate; r != nil && r.throttledNow(now) {
			n++
		}
	}
	s.mu.Unlock()
	return n
}

// liveSessions lists the sessions now.
func (s *Server) liveSessions() []*session {
	s.mu.Lock()
	defer s.mu.Unlock()
	live := make([]*session, 0, len(s.sessions))
	for ss := range s.sessions {
		live = append(live, ss)
	}
	return live
}

// handshakeBegin counts c as a handshake under way.
func (s *Server) handshakeBegin(c net.Conn) {
	s.mu.Lock()
	s.handshakes[c] = struct{}{}
	s.mu.Unlock()
}

// handshakeDone is called when c is a session, or refused.
func (s *Server) handshakeDone(c net.Conn) {
	s.mu.Lock()
	delete(s.handshakes, c)
	s.mu.Unlock()
	s.signalGone()
}

func (s *Server) signalGone() {
	select {
	case s.sessionGone <- struct{}{}:
	default:
	}
}

// waitHandshakes waits until no accepted connection is left waiting to
// become a session, or ctx ends.
func (s *Server) waitHandshakes(ctx context.Context) error {
	return s.waitGone(ctx, func() int { return len(s.handshakes) })
}

// waitSessions waits until no session or upgrade is left, or ctx ends.
func (s *Server) waitSessions(ctx context.Context) error {
	return s.waitGone(ctx, func() int { return len(s.sessions) + len(s.handshakes) })
}

// waitGone waits until left, called under s.mu, is 0, or ctx ends; every
// session or handshake that goes signals sessionGone.
func (s *Server) waitGone(ctx context.Context, left func() int) error {
	for {
		s.mu.Lock()
		n := left()
		s.mu.Unlock()
		if n == 0 {
			return nil
		}
		select {
		case <-s.sessionGone:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// forget removes a finished session from the registry and frees its
// admission slot.
func (s *Server) forget(ss *session) {
	ss.frames.stop()
	s.adm.Leave(ss.clientAddr)
	s.mu.Lock()
	delete(s.sessions, ss)
	s.mu.Unlock()
	s.signalGone()
}

// SessionInfo is what status pages show of a session.
type SessionInfo struct {
	ID            uint64
	Client        string
	Age           time.Duration
	QueueMessages int
	QueueBytes    int64 // UnsentBytes included
	UnsentBytes   int64 // what the kernel holds unacknowledged for the client
	// UpstreamBytes waits for the backend: in sluice and unacknowledged in
	// the kernel.
	UpstreamBytes int64
	Paused        bool
	Slow          bool
	Throttled     bool // held back by an inbound limit within the last second
}

// Eviction is one eviction, as status pages show it.
type Eviction struct {
	Time          time.Time
	ID            uint64
	Client        string
	Reason        string
	QueueMessages int
	QueueBytes    int64 // UnsentBytes included
	UnsentBytes   int64 // what the kernel held unacknowledged for the client
	UpstreamBytes int64 // what waited for the backend, in sluice and in the kernel
}

// evictionLog keeps the most recent evictions, oldest overwritten first.
type evictionLog struct {
	ring [64]Eviction
	next int
	n    int
}

func (l *evictionLog) add(e Eviction) {
	l.ring[l.next] = e
	l.next = (l.next + 1) % len(l.ring)
	l.n = min(l.n+1, len(l.ring))
}

// RecentEvictions returns up to the last 64 evictions, newest first.
func (s *Server) RecentEvictions() []Eviction {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Eviction, 0, s.evictions.n)
	for i := 1; i <= s.evictions.n; i++ {
		out = append(out, s.evictions.ring[(s.evictions.next-i+len(s.evictions.ring))%len(s.evictions.ring)])
	}
	return out
}

// Snapshot lists live sessions for status pages.
func (s *Server) Snapshot() []SessionInfo {
	now := limiter.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]SessionInfo, 0, len(s.sessions))
	for ss := range s.sessions {
		q := ss.client.queue()
		paused, _ := q.Paused()
		out = append(out, SessionInfo{
			ID: ss.id, Client: ss.clientAddr, Age: max(0, time.Duration(now-ss.began)),
			QueueMessages: q.Messages(), QueueBytes: q.Bytes(), UnsentBytes: q.Unsent(), UpstreamBytes: ss.upstream.queuedBytes(), Paused: paused,
			Slow: q.IsSlow(), Throttled: ss.rate != nil && ss.rate.throttledNow(now),
		})
	}
	return out
}
