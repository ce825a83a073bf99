package proxy

// Accept and upgrade without net/http. Per client connection, one
// goroutine (handshake) does everything before the session: the TLS
// handshake when the listener is TLS, the request read straight from the
// socket into a pooled buffer, the checks, the upstream dial and the
// answer in one write, each from package frontdoor. Then it starts the
// session and ends. No bufio, no header map, no context, no background
// reader.

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"syscall"
	"time"

	"github.com/gobwas/ws"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/frame"
	"github.com/sluice-proxy/sluice/frontdoor"
	"github.com/sluice-proxy/sluice/internal/sockopt"
)

// Serve accepts connections on ln until Shutdown, and upgrades each in a
// goroutine of its own. ln may be a TLS listener: the TLS handshake is
// then part of the client's handshake timeout. Serve returns
// http.ErrServerClosed after a Shutdown, as http.Server.Serve does, and
// otherwise the listener's error.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closing.Load() {
		s.mu.Unlock()
		return http.ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
	}()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.closing.Load() {
				return http.ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
				errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, os.ErrDeadlineExceeded) {
				// Out of descriptors, as net/http: wait and retry rather
				// than spin or give up.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn().Err(err).Float64("retry_in_seconds", backoff.Seconds()).Msg("accept failed")
				time.Sleep(backoff)
				continue
			}
			return err
		}
		backoff = 0
		// Counted before the goroutine starts, so that Shutdown, once the
		// listener is closed, waits for every handshake it could miss.
		s.handshakeBegin(c)
		go s.serveConn(c)
	}
}

// serveConn is the goroutine of one accepted connection: its handshake,
// then, once it is a session, its client's first reader. The client's
// first frame (a short session's close) then needs no goroutine, no epoll
// registration and no wake-up of its own, and the reader inherits the
// stack the handshake has grown.
func (s *Server) serveConn(c net.Conn) {
	if ss := s.handshake(c); ss != nil {
		ss.firstClientReader()
	}
}

// handshake reads and answers the request of an accepted connection and
// returns its session, or nil when it is refused.
func (s *Server) handshake(c net.Conn) (ss *session) {
	defer s.handshakeDone(c)
	handedOff := false // to the pass-through server, which closes c
	defer func() {
		if p := recover(); p != nil {
			// net/http recovered a handler's panic; so does sluice, and
			// the connection is dropped.
			s.notePanic("handshake", p, func(e *zerolog.Event) *zerolog.Event {
				return e.Str("client", c.RemoteAddr().String())
			})
		}
		if ss == nil && !handedOff {
			c.Close()
		}
	}()
	began := time.Now()
	deadline := began.Add(s.opts.HandshakeTimeout)
	// The first bytes, as every later read, must come within the idle
	// timeout; the whole request within the handshake timeout.
	c.SetDeadline(minTime(deadline, began.Add(s.opts.HandshakeIdleTimeout)))
	r := frontdoor.GetRequest()
	defer frontdoor.PutRequest(r)
	if s.opts.ProxyProtocol && !s.pp.HeaderOK(c) {
		return nil
	}
	r.RemoteAddr = c.RemoteAddr().String()
	// Counted from here, while the request is still arriving.
	slot, ok := s.adm.Arrive(c, r)
	if !ok {
		return nil
	}
	defer slot.Release() // a no-op once the session has the slot
	if tc, ok := c.(*tls.Conn); ok {
		if err := tc.Handshake(); err != nil {
			// Scanners and wrong ports: a debug line, as net/http's
			// ErrorLog gave.
			s.log.Debug().Err(err).Str("client", r.RemoteAddr).Msg("TLS handshake failed")
			return nil
		}
		r.TLS = true
		// The request's first bytes get an idle timeout of their own.
		c.SetReadDeadline(minTime(deadline, time.Now().Add(s.opts.HandshakeIdleTimeout)))
	}
	pending, err := frontdoor.ReadRequest(c, r, s.opts.MaxHeaderBytes+frontdoor.HeadReadSize, s.opts.HandshakeIdleTimeout, deadline)
	// The answers' deadline is the handshake's, however late the
	// request came within it.
	c.SetWriteDeadline(deadline)
	switch {
	case errors.Is(err, frontdoor.ErrHeadTooLarge):
		s.metrics.rejected.WithLabelValues("header_too_large").Inc()
		frontdoor.WriteBadRequest(c, http.StatusRequestHeaderFieldsTooLarge)
		frontdoor.CloseWriteAndWait(c)
		return nil
	case errors.Is(err, frontdoor.ErrMalformed):
		s.metrics.rejected.WithLabelValues("malformed").Inc()
		frontdoor.WriteBadRequest(c, http.StatusBadRequest)
		return nil
	case errors.Is(err, frontdoor.ErrVersion):
		s.metrics.rejected.WithLabelValues("malformed").Inc()
		frontdoor.WriteBadRequest(c, http.StatusHTTPVersionNotSupported)
		return nil
	case err != nil:
		// Timeout, or gone before a whole request: nothing to answer.
		if !errors.Is(err, io.EOF) {
			s.log.Debug().Err(err).Str("client", r.RemoteAddr).Msg("client request not read")
		}
		return nil
	}
	if h := s.opts.panicHook; h != nil {
		h("handshake", r.RemoteAddr)
	}
	if s.pass != nil && !r.HasToken("Upgrade", "websocket") {
		handedOff = s.pass.HandOff(c, r, pending, &slot, s.closing.Load())
		return nil
	}
	return s.upgrade(c, r, pending, began, &slot)
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// upgrade answers the request r read from c, with pending the bytes that
// followed it: dial the upstream first, then answer the client from the
// upstream's answer, then hand both connections to a session. It returns
// the session, whose client reader the caller starts, or nil, and then the
// caller closes c. slot is c's place under the limits (Admission.Arrive): upgrade
// hands it to the session, or frees it early for a client that may retry.
func (s *Server) upgrade(c net.Conn, r *frontdoor.Request, pending []byte, began time.Time, slot *frontdoor.Slot) *session {
	if status, msg := frontdoor.CheckUpgrade(r); status != 0 {
		s.reject(c, status, "bad_request", msg, 0)
		return nil
	}
	if s.closing.Load() {
		s.reject(c, http.StatusServiceUnavailable, "draining", "sluice is shutting down", 1)
		return nil
	}
	// Admission control (frontdoor.Admission): origin, the per-IP limit of a
	// forwarded client and handshake rate, all before anything is dialled.
	cl := s.adm.ClientOf(r)
	if !s.adm.Admit(c, r, cl, slot) {
		return nil
	}
	// Upgrade pacing (frontdoor.Pacer): wait for a turn toward the backend,
	// held until the upstream has answered.
	turn, ok := s.pacer.TakeTurn(c, cl)
	if !ok {
		return nil
	}
	defer turn.End() // after a panic; a no-op once ended below
	u := frontdoor.GetDialState(&s.dialer)
	defer frontdoor.PutDialState(u)
	target := frontdoor.UpstreamURL(s.opts.Upstream, r.URL)
	upConn, upBuf, hs, err := u.Dial(r, cl, target)
	turn.End()
	// The answer gets a handshake timeout of its own from here, as the
	// upgrader gave it.
	c.SetDeadline(time.Now().Add(s.opts.HandshakeTimeout))
	if err != nil {
		// Free the slot before the client reads its 502: a client that
		// retries at once must find it free.
		slot.Release()
		s.dialFailed(c, target, err, u.Rejection())
		return nil
	}
	key, _ := r.One("Sec-Websocket-Key")
	if err := frontdoor.Write101(c, key, hs, u.Cookies()); err != nil {
		upConn.Write(frame.AppendClose(nil, ws.StatusGoingAway, "client handshake failed", true))
		upConn.Close()
		if upBuf != nil {
			ws.PutReader(upBuf)
		}
		s.metrics.rejected.WithLabelValues("client_handshake").Inc()
		s.log.Debug().Err(err).Str("client", r.RemoteAddr).Msg("client upgrade failed")
		return nil
	}
	c.SetDeadline(time.Time{})
	client := frontdoor.SessionConn(c) // the socket itself beneath a PROXY header
	if s.opts.ClientWriteBuffer > 0 {
		sockopt.SetConnBuffer(client, syscall.SO_SNDBUF, s.opts.ClientWriteBuffer)
	}
	if s.opts.ClientReadBuffer > 0 {
		sockopt.SetConnBuffer(client, syscall.SO_RCVBUF, s.opts.ClientReadBuffer)
	}
	var upstreamPending []byte
	if upBuf != nil {
		upstreamPending, _ = upBuf.Peek(upBuf.Buffered())
	}
	s.metrics.handshakeSeconds.Observe(time.Since(began).Seconds())
	s.metrics.connectionsTotal.Inc()
	ext := frontdoor.ExtensionKind(hs.Extensions)
	slot.HandOff() // released by forget, from the session's client address
	// The frame readers copy both pendings: the buffers they are in may be
	// recycled once startSession returns.
	ss := s.startSession(&upgraded{
		client: client, clientPending: pending,
		upstream: upConn, upstreamPending: upstreamPending,
		clientAddr: cl.Addr, target: target, protocol: hs.Protocol, ext: ext,
	})
	if upBuf != nil {
		ws.PutReader(upBuf)
	}
	return ss
}

// ServeHTTP lets sluice be embedded in an http.Server: the request that
// net/http has read is taken over (hijacked) and upgraded as Serve would.
// Serve is the cheaper way in, with no net/http state per connection.
//
// With Options.HTTPPassThrough, a request that is not an upgrade is sent
// to the upstream's origin instead, through w.
func (s *Server) ServeHTTP(w http.ResponseWriter, hr *http.Request) {
	if s.pass != nil && !frontdoor.IsUpgradeRequest(hr) {
		s.pass.Serve(w, hr)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok || hr.ProtoMajor != 1 {
		s.metrics.rejected.WithLabelValues("bad_request").Inc()
		w.Header().Set("Connection", "close")
		http.Error(w, "WebSocket upgrades need HTTP/1.1", http.StatusBadRequest)
		return
	}
	began := time.Now()
	c, rw, err := hj.Hijack()
	if err != nil {
		return
	}
	// An upgrade on a kept-alive pass-through connection: the upgrade
	// takes a slot of its own.
	frontdoor.ReleasePassSlot(c)
	s.handshakeBegin(c)
	defer s.handshakeDone(c)
	r := frontdoor.GetRequest()
	defer frontdoor.PutRequest(r)
	frontdoor.RequestFromHTTP(hr, r)
	var pending []byte
	if n := rw.Reader.Buffered(); n > 0 {
		pending, _ = rw.Reader.Peek(n)
	}
	c.SetDeadline(time.Now().Add(s.opts.HandshakeTimeout))
	slot, ok := s.adm.Arrive(c, r)
	if !ok {
		c.Close()
		return
	}
	defer slot.Release()
	if ss := s.upgrade(c, r, pending, began, &slot); ss != nil {
		ss.client.startReading() // net/http's goroutine is not ours to keep
	} else {
		c.Close()
	}
}

// ProxyProtocolListener wraps ln, a TCP listener, so that each connection
// it accepts must start with a PROXY header: use it for Serve when
// Options.ProxyProtocol is set, beneath a TLS listener if there is one
// (the header comes before TLS). With Options.TrustedProxies set, a peer
// outside them is closed as soon as it is accepted. The header is read by
// the connection's handshake goroutine, within HandshakeTimeout; a
// connection without one is closed there, counted and logged.
func (s *Server) ProxyProtocolListener(ln net.Listener) net.Listener { return s.pp.Listener(ln) }

// reject answers c with status and msg, counted under reason; retry > 0
// is a Retry-After.
func (s *Server) reject(c net.Conn, status int, reason, msg string, retry int) {
	s.metrics.rejected.WithLabelValues(reason).Inc()
	frontdoor.WriteError(c, status, msg, retry)
}

// logURL is target as this server's log lines carry it.
func (s *Server) logURL(target string) string { return frontdoor.LogURL(target, s.opts.LogQuery) }

func (s *Server) dialFailed(c net.Conn, target string, err error, rej *frontdoor.Rejection) {
	status, reason := frontdoor.DialFailure(err)
	if rej != nil && rej.Bad() {
		// An answer sluice will not relay: too large or malformed.
		status, reason, rej = http.StatusBadGateway, "handshake", nil
		err = frontdoor.ErrUpstreamBadHeader
	}
	s.metrics.dialFailures.WithLabelValues(reason).Inc()
	if reason == "client_gone" {
		return
	}
	if rej != nil {
		// The upstream answered, only not with 101: its answer is the
		// client's answer.
		s.metrics.rejected.WithLabelValues("upstream_status").Inc()
		frontdoor.WriteRejection(c, rej)
		return
	}
	// A dead upstream fails every upgrade at once: one line a second says
	// so, with the count, rather than one per client.
	if n, ok := s.dialFailLog.Note(time.Since(s.adm.Began())); ok {
		s.log.Warn().Err(err).Str("upstream", s.logURL(target)).Str("reason", reason).Uint64("failures", n).Msg("upstream dial failed")
	}
	s.reject(c, status, "upstream_"+reason, "upstream "+reason, 0)
}
