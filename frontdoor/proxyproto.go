package frontdoor

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
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// ProxyProtocol checks the PROXY headers of one server's connections.
type ProxyProtocol struct {
	trusted       []netip.Prefix // empty: any peer may send a header
	headerTimeout time.Duration
	rejected      *prometheus.CounterVec
	log           zerolog.Logger
	began         time.Time // the epoch of refused
	refused       RejectLog // connections refused for their header, logged at most once a second
}

// NewProxyProtocol checks headers from trusted peers only (any peer when
// trusted is empty), each read within headerTimeout (Options.HandshakeTimeout);
// refusals are counted in rejected (sluice_connections_rejected_total) and
// logged to log at most once a second.
func NewProxyProtocol(trusted []netip.Prefix, headerTimeout time.Duration, rejected *prometheus.CounterVec, log zerolog.Logger) *ProxyProtocol {
	return &ProxyProtocol{trusted: trusted, headerTimeout: headerTimeout, rejected: rejected, log: log, began: time.Now()}
}

// Listener wraps ln, a TCP listener, so that each connection it accepts
// must start with a PROXY header: use it for Serve when
// Options.ProxyProtocol is set, beneath a TLS listener if there is one
// (the header comes before TLS). With TrustedProxies set, a peer outside
// them is closed as soon as it is accepted. The header is read by the
// connection's handshake goroutine, within HandshakeTimeout; a
// connection without one is closed there, counted and logged (HeaderOK).
func (pp *ProxyProtocol) Listener(ln net.Listener) net.Listener {
	return &proxyproto.Listener{
		Listener:          ln,
		ConnPolicy:        pp.policy,
		ReadHeaderTimeout: pp.headerTimeout,
	}
}

// errUntrustedPeer refuses a peer that is not a trusted proxy. It wraps
// ErrInvalidUpstream so that the listener closes the connection and goes
// on accepting.
var errUntrustedPeer = fmt.Errorf("frontdoor: PROXY header from a peer outside TrustedProxies: %w", proxyproto.ErrInvalidUpstream)

// policy requires the header from every peer, and with TrustedProxies
// set, refuses the peers outside them.
func (pp *ProxyProtocol) policy(o proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) {
	if len(pp.trusted) == 0 {
		return proxyproto.REQUIRE, nil
	}
	peer := o.Upstream.String()
	if ap, err := netip.ParseAddrPort(peer); err == nil && TrustedAddr(pp.trusted, ap.Addr().Unmap()) {
		return proxyproto.REQUIRE, nil
	}
	pp.refuse(peer, errUntrustedPeer)
	return proxyproto.REJECT, errUntrustedPeer
}

// HeaderOK reports whether c, as the listener from Listener accepted it,
// began with a valid PROXY header. If not, it has counted and logged the
// refusal; the caller closes c.
func (pp *ProxyProtocol) HeaderOK(c net.Conn) bool {
	pc, ok := c.(*proxyproto.Conn)
	if tc, isTLS := c.(*tls.Conn); isTLS {
		pc, ok = tc.NetConn().(*proxyproto.Conn)
	}
	if !ok {
		pp.refuse(c.RemoteAddr().String(), errors.New("frontdoor: Options.ProxyProtocol is set but Serve's listener is not ProxyProtocolListener's"))
		return false
	}
	if pc.ProxyHeader() != nil {
		return true
	}
	_, err := pc.Read(nil) // the header's error, kept by the conn
	pp.refuse(pc.Raw().RemoteAddr().String(), err)
	return false
}

// SessionConn is the connection a session reads and writes in place of c:
// beneath a PROXY-protocol connection, the TCP connection itself, so that
// the session gets its descriptor (Reader.Serve, epoll parking, batched
// writev, the unsent-bytes count: without it, every frame it writes
// costs a goroutine, and every idle session a stack). Call it only after
// ReadRequest: the library buffers at most 256 bytes past the header
// (its default, which Listener keeps), and hands them all to the first
// read, which is ReadRequest's, of HeadReadSize; from then on its reads
// go straight to the socket, and its writes always do. Any other c,
// TLS included, is returned as it is.
func SessionConn(c net.Conn) net.Conn {
	if pc, ok := c.(*proxyproto.Conn); ok {
		return pc.Raw()
	}
	return c
}

// refuse counts a connection refused for its PROXY header and logs a
// line at most once a second.
func (pp *ProxyProtocol) refuse(peer string, err error) {
	pp.rejected.WithLabelValues("proxy_protocol").Inc()
	if n, ok := pp.refused.Note(time.Since(pp.began)); ok {
		pp.log.Warn().Err(err).Str("peer", peer).Uint64("rejected", n).Msg("connections without a valid PROXY header refused")
	}
}
