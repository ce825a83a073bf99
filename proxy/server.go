// Package proxy splices WebSocket connections: each client connection is
// paired with one upstream connection, and frames flow both ways through
// bounded queues, one writer goroutine per socket.
package proxy

import (
	"context"
	"errors"
	stdlog "log"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gobwas/ws"
	"github.com/rs/zerolog"

	"sluice/frame"
	"sluice/limiter"
)

// httpErrorLog sends net/http's own complaints (TLS handshake errors from
// scanners, malformed requests) to the structured log at debug level,
// instead of plain lines on stderr.
type httpErrorLog struct{ log zerolog.Logger }

func (w httpErrorLog) Write(p []byte) (int, error) {
	w.log.Debug().Str("source", "net/http").Msg(strings.TrimSpace(string(p)))
	return len(p), nil
}

// setSocketBuffer sets opt (SO_RCVBUF or SO_SNDBUF) of the socket c to n
// bytes.
func setSocketBuffer(c syscall.RawConn, opt, n int) error {
	var serr error
	if err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, opt, n) }); err != nil {
		return err
	}
	return serr
}

// receiveBuffer is a net.Dialer Control that sets SO_RCVBUF to n before
// the socket connects, so the window it advertises is small from the
// start.
func receiveBuffer(n int) func(network, address string, c syscall.RawConn) error {
	return func(_, _ string, c syscall.RawConn) error { return setSocketBuffer(c, syscall.SO_RCVBUF, n) }
}

// setConnBuffer sets opt (SO_RCVBUF or SO_SNDBUF) of the socket under
// conn, a TLS connection's included. A failure keeps the kernel's
// default, which works: it is ignored.
func setConnBuffer(conn net.Conn, opt, n int) {
	if tc, ok := conn.(interface{ NetConn() net.Conn }); ok {
		conn = tc.NetConn()
	}
	if sc, ok := conn.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			setSocketBuffer(raw, opt, n)
		}
	}
}

// Server accepts WebSocket upgrades and proxies each to the upstream.
// Sessions outlive the HTTP handler that made them: net/http's Shutdown
// does not see hijacked connections, so the Server tracks them itself.
type Server struct {
	opts    Options
	log     zerolog.Logger
	metrics *Metrics
	budget  *limiter.Budget
	adm     *admission // connection limits, origins, handshake rate (admission.go)
	http    *http.Server
	netDial func(ctx context.Context, network, addr string) (net.Conn, error)
	idle    *idlePoller   // parked readers of idle sockets; nil: readers wait in goroutines
	fair    *limiter.Fair // Options.UpstreamMaxMessagesPerSecond; nil: no cap

	nextID   atomic.Uint64
	draining atomic.Bool // readiness fails: BeginDrain or Shutdown was called
	closing  atomic.Bool // new upgrades are refused: Shutdown was called; set under mu
	// lastUpstreamOK is the unix nanotime of the last successful upstream
	// TCP connect, for readiness.
	lastUpstreamOK atomic.Int64

	dialFailLog rejectLog // upstream dial failures, logged at most once a second

	mu        sync.Mutex
	sessions  map[*session]struct{} // guarded by mu
	inflight  int                   // upgrades being handled, guarded by mu
	evictions evictionLog           // guarded by mu
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
	adm, err := newAdmission(&opts)
	if err != nil {
		return nil, err
	}
	s := &Server{
		opts:        opts,
		log:         opts.Logger,
		metrics:     newMetrics(opts.Registerer),
		adm:         adm,
		sessions:    make(map[*session]struct{}),
		sessionGone: make(chan struct{}, 1),
	}
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
	s.http = &http.Server{
		Handler:           s,
		ReadHeaderTimeout: opts.HandshakeTimeout,
		ReadTimeout:       opts.HandshakeTimeout,
		MaxHeaderBytes:    opts.MaxHeaderBytes,
		ErrorLog:          stdlog.New(httpErrorLog{opts.Logger}, "", 0),
	}
	s.http.SetKeepAlivesEnabled(false)
	// No TCP keepalive: sluice pings at the WebSocket layer, and the
	// kernel's probes cost four setsockopt calls per connection.
	d := net.Dialer{KeepAlive: -1}
	if opts.UpstreamReadBuffer > 0 {
		d.Control = receiveBuffer(opts.UpstreamReadBuffer)
	}
	s.netDial = d.DialContext
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

// Serve accepts connections on ln until Shutdown. It returns
// http.ErrServerClosed after a Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	return s.http.Serve(ln)
}

// Shutdown stops accepting, sends 1001 Going Away to every client and its
// upstream after their queued data — spread over Options.DrainSpread so
// clients do not all reconnect at once — and waits for the sessions to
// finish their close handshakes. When ctx ends first, the rest are cut off
// and ctx's error is returned.
func (s *Server) Shutdown(ctx context.Context) error {
	s.draining.Store(true)
	s.mu.Lock()
	s.closing.Store(true)
	s.mu.Unlock()
	err := s.http.Shutdown(ctx)
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
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
			ss.abort("shutdown timeout")
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
		if r := ss.client.rate; r != nil && r.throttledNow(now) {
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

func (s *Server) handshakeDone() {
	s.mu.Lock()
	s.inflight--
	s.mu.Unlock()
	s.signalGone()
}

func (s *Server) signalGone() {
	select {
	case s.sessionGone <- struct{}{}:
	default:
	}
}

// waitSessions waits until no session or upgrade is left, or ctx ends.
func (s *Server) waitSessions(ctx context.Context) error {
	for {
		s.mu.Lock()
		n := len(s.sessions) + s.inflight
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

// ServeHTTP answers one upgrade request: dial the upstream first, then
// answer the client from the upstream's answer, then hand both connections
// to a session and return, so no HTTP state outlives the handshake.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	began := time.Now()
	if status, msg := checkUpgrade(r); status != 0 {
		s.reject(w, status, "bad_request", msg)
		return
	}
	// An upgrade under way is counted, so that Shutdown waits for the
	// session it may still become: net/http forgets a connection once it
	// is hijacked.
	s.mu.Lock()
	if s.closing.Load() {
		s.mu.Unlock()
		w.Header().Set("Retry-After", "1")
		s.reject(w, http.StatusServiceUnavailable, "draining", "sluice is shutting down")
		return
	}
	s.inflight++
	s.mu.Unlock()
	defer s.handshakeDone()
	// Admission control (admission.go): origin, connection limits and
	// handshake rate, all before anything is dialled.
	cl := s.adm.clientOf(r)
	slot, ok := s.admit(w, r, cl)
	if !ok {
		return
	}
	defer slot.release() // a no-op once the session has the slot
	clientIP, _, _ := net.SplitHostPort(r.RemoteAddr)
	u := getDialState(s)
	defer putDialState(u)
	u.header.forwardTo(r, clientIP, cl.xff)
	protocols, exts := offers(r, s.opts.Queue.Policy)
	dialer := ws.Dialer{
		Timeout:       s.opts.DialTimeout,
		Protocols:     protocols,
		Extensions:    exts,
		Header:        &u.header,
		Host:          s.opts.Upstream.Host,
		TLSConfig:     s.opts.UpstreamTLS,
		NetDial:       u.netDial,
		OnStatusError: u.onStatusError,
		OnHeader:      u.onHeader,
	}
	target := upstreamURL(s.opts.Upstream, r)
	// A context that never ends: the Dialer then bounds the dial with
	// Timeout alone, instead of starting a goroutine per dial to watch the
	// request's context. A client gone meanwhile is noticed when its 101
	// cannot be written.
	upConn, upBuf, hs, err := dialer.Dial(context.WithoutCancel(r.Context()), target)
	if err != nil {
		s.dialFailed(w, r, target, err, u.rej)
		return
	}
	var header http.Header // most upgrades add nothing: no map for them
	if hs.Protocol != "" || len(hs.Extensions) > 0 || len(u.cookies) > 0 {
		header = http.Header{}
	}
	if hs.Protocol != "" {
		header.Set("Sec-WebSocket-Protocol", hs.Protocol)
	}
	if len(hs.Extensions) > 0 {
		header.Set("Sec-WebSocket-Extensions", renderOptions(hs.Extensions))
	}
	for _, c := range u.cookies {
		header.Add("Set-Cookie", c)
	}
	// checkUpgrade accepted the request with the tokens anywhere in
	// Upgrade and Connection; the upgrader reads only the first value, so
	// give it the canonical ones rather than fail after the upstream
	// already said yes.
	if v := r.Header["Upgrade"]; len(v) != 1 || v[0] != "websocket" {
		r.Header.Set("Upgrade", "websocket")
	}
	if v := r.Header["Connection"]; len(v) != 1 || v[0] != "Upgrade" {
		r.Header.Set("Connection", "Upgrade")
	}
	up := ws.HTTPUpgrader{Timeout: s.opts.HandshakeTimeout, Header: header}
	conn, rw, _, err := up.Upgrade(r, w)
	if err != nil {
		if conn != nil {
			conn.Close()
		}
		upConn.Write(frame.AppendClose(nil, ws.StatusGoingAway, "client handshake failed", true))
		upConn.Close()
		if upBuf != nil {
			ws.PutReader(upBuf)
		}
		s.metrics.rejected.WithLabelValues("client_handshake").Inc()
		s.log.Debug().Err(err).Str("client", r.RemoteAddr).Msg("client upgrade failed")
		return
	}
	if s.opts.ClientWriteBuffer > 0 {
		setConnBuffer(conn, syscall.SO_SNDBUF, s.opts.ClientWriteBuffer)
	}
	var clientPending, upstreamPending []byte
	if rw != nil && rw.Reader.Buffered() > 0 {
		clientPending, _ = rw.Reader.Peek(rw.Reader.Buffered())
	}
	if upBuf != nil {
		upstreamPending, _ = upBuf.Peek(upBuf.Buffered())
	}
	s.metrics.handshakeSeconds.Observe(time.Since(began).Seconds())
	s.metrics.connectionsTotal.Inc()
	ext := extensionKind(hs.Extensions)
	slot.handOff() // released by forget, from the session's client address
	s.startSession(conn, clientPending, upConn, upstreamPending, cl.addr, target, hs.Protocol, ext)
	if upBuf != nil {
		ws.PutReader(upBuf)
	}
}

func (s *Server) reject(w http.ResponseWriter, status int, reason, msg string) {
	s.metrics.rejected.WithLabelValues(reason).Inc()
	if status == http.StatusUpgradeRequired {
		w.Header().Set("Upgrade", "websocket")
		w.Header().Set("Sec-WebSocket-Version", "13")
	}
	w.Header().Set("Connection", "close")
	http.Error(w, msg, status)
}

func (s *Server) dialFailed(w http.ResponseWriter, r *http.Request, target string, err error, rej *rejection) {
	status, reason := dialFailure(err)
	s.metrics.dialFailures.WithLabelValues(reason).Inc()
	if reason == "client_gone" {
		return
	}
	if rej != nil {
		// The upstream answered, only not with 101: its answer is the
		// client's answer.
		s.metrics.rejected.WithLabelValues("upstream_status").Inc()
		for k, vs := range rej.header {
			for _, v := range vs {
				w.Header().Add(k, v)
			}
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(rej.body)))
		w.Header().Set("Connection", "close")
		w.WriteHeader(rej.status)
		w.Write(rej.body)
		return
	}
	// A dead upstream fails every upgrade at once: one line a second says
	// so, with the count, rather than one per client.
	if n, ok := s.dialFailLog.note(time.Since(s.adm.began)); ok {
		s.log.Warn().Err(err).Str("upstream", target).Str("reason", reason).Uint64("failures", n).Msg("upstream dial failed")
	}
	s.reject(w, status, "upstream_"+reason, "upstream "+reason)
}

// forget removes a finished session from the registry and frees its
// admission slot.
func (s *Server) forget(ss *session) {
	ss.frames.stop()
	s.adm.leave(ss.clientAddr)
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
	Depth         int   // messages behind: queued, and held back in the kernel (limiter.Queue.Depth)
	QueueBytes    int64 // UnsentBytes included
	UnsentBytes   int64 // what the kernel held unacknowledged for the client
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
		q := ss.client.out
		paused, _ := q.Paused()
		out = append(out, SessionInfo{
			ID: ss.id, Client: ss.clientAddr, Age: time.Since(ss.began),
			QueueMessages: q.Messages(), QueueBytes: q.Bytes(), UnsentBytes: q.Unsent(), Paused: paused,
			Slow: q.IsSlow(), Throttled: ss.client.rate != nil && ss.client.rate.throttledNow(now),
		})
	}
	return out
}
