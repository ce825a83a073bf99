package proxy

import (
	"crypto/tls"
	"errors"
	"net/netip"
	"net/url"
	"time"

	"github.com/gobwas/ws"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/frame"
	"github.com/sluice-proxy/sluice/keepalive"
	"github.com/sluice-proxy/sluice/limiter"
)

// Options configure a Server. The zero value of a field means its default,
// except where said.
type Options struct {
	// Upstream is the backend's ws:// or wss:// URL; each client request's
	// path and query are joined to it.
	Upstream *url.URL
	// Logger receives one line per session event that matters.
	Logger zerolog.Logger
	// Registerer receives the proxy's metrics; nil keeps them private.
	Registerer prometheus.Registerer
	// LogQuery logs the query values of clients' URLs; by default log
	// lines keep the path and the query's keys only (LogURL), since apps
	// put tokens there.
	LogQuery bool

	DialTimeout      time.Duration // upstream connect and handshake; default 5s
	HandshakeTimeout time.Duration // client request headers; default 10s
	// HandshakeIdleTimeout bounds each wait for more of the request,
	// the first bytes included, within HandshakeTimeout: a client that
	// stops sending frees its slot sooner. Default 5s.
	HandshakeIdleTimeout time.Duration
	WriteTimeout         time.Duration // one write to a client's socket; default 10s
	// UpstreamWriteTimeout bounds one write to an upstream socket, and a
	// client's wait for room in its upstream queue (whose bytes include
	// what the kernel holds unsent): a backend that takes too little for
	// that long has stopped reading, and
	// its sessions end with UpstreamFailureCode (1014). Default 30s: a
	// wedged backend costs all of its clients at once, so a GC pause or a
	// brief overload must not end them, and with UpstreamWriteBuffer the
	// wait holds little memory, counted under the ceiling.
	UpstreamWriteTimeout time.Duration
	CloseTimeout         time.Duration // a close handshake, both legs; default 5s
	DrainSpread          time.Duration // Shutdown's 1001s are spread over this; 0: all at once
	// NoIdlePoll makes the reader of a quiet socket wait in its own
	// goroutine for good instead of leaving the socket in the shared epoll
	// set after a second (Linux): about 4 KiB of stack more per idle socket.
	NoIdlePoll     bool
	MaxHeaderBytes int // client request headers; default 32 KiB

	// MaxFrameBytes and MaxMessageBytes bound what a client may send
	// (1009 past them); 0 means no bound. The upstream is trusted.
	MaxFrameBytes   int64
	MaxMessageBytes int64

	// FrameReadTimeout bounds how long a client takes to send one frame,
	// from its header to the last byte of its payload; a client that
	// stalls mid-frame is evicted (read_timeout, 1013). Between frames a
	// client may idle. 0 means no bound.
	FrameReadTimeout time.Duration
	// UpstreamFrameReadTimeout bounds a stall of the upstream in the
	// middle of a frame: once a frame's header has come, the rest of it
	// must keep arriving (a read deadline, set only while a payload is
	// awaited). A backend that stops mid-frame ends the session, 1014 to
	// the client after the messages that did arrive. 0 means no bound.
	UpstreamFrameReadTimeout time.Duration

	// Admission control, checked before the upstream is dialled (see
	// frontdoor.Admission). 0 or empty means no check, for each.
	//
	// MaxConnections bounds the connections admitted at once, from their
	// accept: requests still arriving and handshakes in progress count.
	// Past it, 503 with Retry-After.
	MaxConnections int
	// MaxConnectionsPerIP bounds them per client address (per /64 for
	// IPv6), from the accept for a peer that is not a trusted proxy:
	// past it, 429 with Retry-After.
	MaxConnectionsPerIP int
	// TrustedProxies are the peers believed when their X-Forwarded-For or
	// Forwarded header names the client (when both name one and they
	// differ, neither: frontdoor.ResolveClient). The client so found is the one the
	// limits count, the logs name, and the last entry of the
	// X-Forwarded-For sent upstream. Forwarded and X-Real-IP go upstream
	// from these peers only.
	TrustedProxies []netip.Prefix
	// AllowedOrigins lists the origins browsers may connect from
	// (https://app.example.com, or https://*.example.com for every
	// subdomain); another Origin gets 403. Requests without an Origin
	// header pass. New fails on an entry CheckOriginPattern rejects.
	AllowedOrigins []string
	// MaxHandshakesPerSecond bounds new upgrades with a token bucket whose
	// burst equals the rate: past it, 503 with Retry-After, so a reconnect
	// storm cannot overload the upstream.
	MaxHandshakesPerSecond int

	// Upgrade pacing toward the backend (frontdoor.Pacer): an upgrade over
	// these limits waits its turn, fairly across client addresses, rather
	// than being refused. 0 turns each limit off; both 0, no pacing.
	//
	// UpstreamMaxHandshakes bounds the upgrades under way toward the
	// backend at once, from the dial to its 101 or failure; sessions hold
	// none.
	UpstreamMaxHandshakes int
	// UpstreamHandshakesPerSecond spaces upgrades' starts evenly (a burst
	// of one).
	UpstreamHandshakesPerSecond int
	// UpstreamQueueTimeout is the longest an upgrade waits for its turn;
	// past it, 503 with Retry-After. Default 10s.
	UpstreamQueueTimeout time.Duration
	// UpstreamHandshakeQueue bounds the upgrades waiting; past it, 503
	// with Retry-After. Default MaxConnections, or 10,000 without one.
	UpstreamHandshakeQueue int

	// HTTPPassThrough sends every request that is not a WebSocket upgrade
	// to the upstream's origin (ws:// as http://, wss:// as https:// with
	// UpstreamTLS), streamed both ways, so one port serves an app's pages,
	// health checks, SSE and long-polling besides its WebSockets. Off,
	// such requests get 426.
	HTTPPassThrough bool
	// HTTPResponseTimeout bounds the wait for the upstream's response
	// headers to a passed-through request (long-polls included); the
	// body may then take as long as it takes. Default 60s.
	HTTPResponseTimeout time.Duration

	// ProxyProtocol requires every connection to start with a PROXY
	// protocol header (v1 or v2) whose source address is then the client.
	// Serve's listener must come from ProxyProtocolListener; with
	// TrustedProxies set, only those peers may connect.
	ProxyProtocol bool

	// UpstreamFailureCode is the close code clients get when the upstream
	// fails: 1014 by default; 1011 or 1012 for fleets whose client library
	// rejects 1014.
	UpstreamFailureCode ws.StatusCode
	// UpstreamTLS configures TLS to a wss:// upstream (custom CAs, a
	// client certificate); nil uses the system roots. The dialer clones it
	// to set ServerName when that is empty. Unused for ws://.
	UpstreamTLS *tls.Config
	// UpstreamReadBuffer is SO_RCVBUF for upstream sockets, so that a
	// paused reader pushes back on the backend quickly; 0 keeps the
	// kernel's default.
	UpstreamReadBuffer int
	// UpstreamWriteBuffer is SO_SNDBUF for upstream sockets, set before
	// they connect. The kernel's autotuned send buffer grows to megabytes
	// per connection toward a backend that stops reading, outside every
	// bound of sluice's; a fixed one bounds it, and what it holds is
	// counted (SIOCOUTQ) as queued. 0 keeps the kernel's default.
	UpstreamWriteBuffer int
	// ClientReadBuffer is SO_RCVBUF for client sockets, set once they are
	// upgraded: it bounds what the kernel holds of what a client sent
	// while its upstream is not draining (the client's reader waits, the
	// client's window closes). Set after the handshake, it stops the
	// window from growing rather than shrinking it. 0 keeps the kernel's
	// default.
	ClientReadBuffer int
	// ClientWriteBuffer is SO_SNDBUF for client sockets. The kernel's
	// autotuned send buffer can hold megabytes for a stalled client
	// before its queue in sluice even starts to grow; a fixed buffer makes
	// sluice see a slow client sooner and bounds that kernel memory. 0
	// keeps the kernel's default.
	ClientWriteBuffer int

	// ClientRate bounds what each client may send (ratelimit.go); the
	// zero value sets no limit.
	ClientRate RateLimit
	// UpstreamMaxMessagesPerSecond caps the messages (and pings) of all
	// clients together toward the backend, shared fairly: a client that
	// floods waits its turn behind the quiet ones. 0 means no cap.
	UpstreamMaxMessagesPerSecond int64

	// Queue bounds each client's downstream queue.
	Queue limiter.Config
	// Budget bounds all queues together.
	Budget limiter.BudgetConfig

	// Keepalive pings clients; UpstreamKeepalive pings the upstream.
	Keepalive         keepalive.Config
	UpstreamKeepalive keepalive.Config

	// panicHook, set by tests only, is called with where ("handshake",
	// "reader", "timer") and the client's address at points where a
	// panic must end one session only: tests panic in it.
	panicHook func(where, client string)
	// waitAgainHook, set by tests only, is called when a reader's idle
	// wait passed with data seen and it waits again (quiet).
	waitAgainHook func(upstream bool)
}

func (o *Options) setDefaults() error {
	if o.Upstream == nil || o.Upstream.Host == "" {
		return errors.New("proxy: Options.Upstream must be a ws:// or wss:// URL with a host")
	}
	switch o.Upstream.Scheme {
	case "ws", "wss":
	default:
		return errors.New("proxy: Options.Upstream scheme must be ws or wss")
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&o.DialTimeout, 5*time.Second)
	def(&o.HandshakeTimeout, 10*time.Second)
	def(&o.HandshakeIdleTimeout, 5*time.Second)
	def(&o.WriteTimeout, 10*time.Second)
	def(&o.UpstreamWriteTimeout, 30*time.Second)
	def(&o.CloseTimeout, 5*time.Second)
	def(&o.HTTPResponseTimeout, 60*time.Second)
	def(&o.UpstreamQueueTimeout, 10*time.Second)
	if o.UpstreamMaxHandshakes < 0 || o.UpstreamHandshakesPerSecond < 0 || o.UpstreamHandshakeQueue < 0 {
		return errors.New("proxy: UpstreamMaxHandshakes, UpstreamHandshakesPerSecond and UpstreamHandshakeQueue must not be negative")
	}
	if o.FrameReadTimeout < 0 || o.UpstreamFrameReadTimeout < 0 || o.MaxConnections < 0 || o.MaxConnectionsPerIP < 0 || o.MaxHandshakesPerSecond < 0 {
		return errors.New("proxy: FrameReadTimeout, UpstreamFrameReadTimeout, MaxConnections, MaxConnectionsPerIP and MaxHandshakesPerSecond must not be negative")
	}
	if r := &o.ClientRate; r.MessagesPerSecond < 0 || r.BytesPerSecond < 0 || r.ThrottleMax < 0 || r.Burst < 0 || o.UpstreamMaxMessagesPerSecond < 0 {
		return errors.New("proxy: ClientRate and UpstreamMaxMessagesPerSecond must not be negative")
	}
	if o.ClientRate.Burst == 0 {
		o.ClientRate.Burst = time.Second
	}
	if o.MaxHeaderBytes <= 0 {
		o.MaxHeaderBytes = 32 << 10
	}
	if o.UpstreamFailureCode == 0 {
		o.UpstreamFailureCode = frame.StatusBadGateway
	}
	for _, k := range []*keepalive.Config{&o.Keepalive, &o.UpstreamKeepalive} {
		if k.Interval < 0 {
			return errors.New("proxy: keepalive interval must not be negative")
		}
		if k.Interval > 0 && k.Timeout <= 0 {
			k.Timeout = min(10*time.Second, k.Interval/2)
		}
		if k.Interval > 0 && k.Timeout >= k.Interval {
			return errors.New("proxy: keepalive pong timeout must be shorter than the ping interval")
		}
	}
	q := &o.Queue
	if q.MaxMessages <= 0 {
		q.MaxMessages = 100
	}
	if q.MaxBytes <= 0 {
		q.MaxBytes = 10 << 20
	}
	if q.LowWater <= 0 || q.LowWater >= 1 {
		q.LowWater = 0.5
	}
	if q.KeepNewest <= 0 || q.KeepNewest > q.MaxMessages {
		q.KeepNewest = min(10, q.MaxMessages)
	}
	if q.EvictGrace == 0 {
		// Ten of the guard's samples without a byte taken: a client that
		// reads never goes that long on a busy machine (its unsent bytes
		// move whenever it reads), while one that stalled before its
		// queue filled is evicted as soon as it fills. A negative value
		// evicts at once.
		q.EvictGrace = 500 * time.Millisecond
	}
	if q.SlowAge <= 0 {
		q.SlowAge = 5 * time.Second
	}
	return nil
}
