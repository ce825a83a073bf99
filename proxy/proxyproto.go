package proxy

// PROXY protocol (Options.ProxyProtocol): a load balancer in front at L4
// (HAProxy send-proxy, AWS NLB, nginx proxy_protocol) opens every
// connection with a v1 or v2 header naming the client; that address is
// then the client for the limits, the logs, the status page and
// X-Forwarded-For. github.com/pires/go-proxyproto parses it.

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/pires/go-proxyproto"
	"github.com/sluice-proxy/sluice/frontdoor"
)

// ProxyProtocolListener wraps ln, a TCP listener, so that each connection
// it accepts must start with a PROXY header: use it for Serve when
// Options.ProxyProtocol is set, beneath a TLS listener if there is one
// (the header comes before TLS). With Options.TrustedProxies set, a peer
// outside them is closed as soon as it is accepted. The header is read by
// the connection's handshake goroutine, within HandshakeTimeout; a
// connection without one is closed there, counted and logged.
func (s *Server) ProxyProtocolListener(ln net.Listener) net.Listener {
	return &proxyproto.Listener{
		Listener:          ln,
		ConnPolicy:        s.proxyHeaderPolicy,
		ReadHeaderTimeout: s.opts.HandshakeTimeout,
	}
}

// errUntrustedPeer refuses a peer that is not a trusted proxy. It wraps
// ErrInvalidUpstream so that the listener closes the connection and goes
// on accepting.
var errUntrustedPeer = fmt.Errorf("proxy: PROXY header from a peer outside TrustedProxies: %w", proxyproto.ErrInvalidUpstream)

// proxyHeaderPolicy requires the header from every peer, and with
// TrustedProxies set, refuses the peers outside them.
func (s *Server) proxyHeaderPolicy(o proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) {
	if len(s.adm.trusted) == 0 {
		return proxyproto.REQUIRE, nil
	}
	peer := o.Upstream.String()
	if ap, err := netip.ParseAddrPort(peer); err == nil && frontdoor.TrustedAddr(s.adm.trusted, ap.Addr().Unmap()) {
		return proxyproto.REQUIRE, nil
	}
	s.proxyHeaderRefused(peer, errUntrustedPeer)
	return proxyproto.REJECT, errUntrustedPeer
}

// proxyHeaderOK reports whether c, as the listener from
// ProxyProtocolListener accepted it, began with a valid PROXY header. If
// not, it has counted and logged the refusal; the caller closes c.
func (s *Server) proxyHeaderOK(c net.Conn) bool {
	pc, ok := c.(*proxyproto.Conn)
	if tc, isTLS := c.(*tls.Conn); isTLS {
		pc, ok = tc.NetConn().(*proxyproto.Conn)
	}
	if !ok {
		s.proxyHeaderRefused(c.RemoteAddr().String(), errors.New("proxy: Options.ProxyProtocol is set but Serve's listener is not ProxyProtocolListener's"))
		return false
	}
	if pc.ProxyHeader() != nil {
		return true
	}
	_, err := pc.Read(nil) // the header's error, kept by the conn
	s.proxyHeaderRefused(pc.Raw().RemoteAddr().String(), err)
	return false
}

// proxyHeaderRefused counts a connection refused for its PROXY header and
// logs a line at most once a second.
func (s *Server) proxyHeaderRefused(peer string, err error) {
	s.metrics.rejected.WithLabelValues("proxy_protocol").Inc()
	if n, ok := s.proxyHeaderLog.note(time.Since(s.adm.began)); ok {
		s.log.Warn().Err(err).Str("peer", peer).Uint64("rejected", n).Msg("connections without a valid PROXY header refused")
	}
}
