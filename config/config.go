// Package config is sluice's configuration: every setting, read once from
// SLUICE_* environment variables, checked with messages that name the
// variable, the value and what is allowed, and mapped to the proxy's
// options in one place (ProxyOptions).
package config

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caarlos0/env/v11"
	"github.com/rs/zerolog"
	"github.com/sluice-proxy/sluice/frontdoor"
)

// Prefix is prepended to every variable name of Config.
const Prefix = "SLUICE_"

// Config is every setting of sluice, read once from SLUICE_* environment
// variables by Load. Fields are grouped as in config.example.env.
//
// Each field carries three tags: env (the name without the prefix),
// envDefault, and want, the allowed form quoted in error messages. Tests
// check that config.example.env lists every field with its default.
type Config struct {
	// --- listener ---

	// ListenAddr is the host:port the proxy accepts WebSocket clients on.
	// Port 0 picks a free port (tests).
	ListenAddr string `env:"LISTEN_ADDR" envDefault:":8080" want:"a host:port such as :8080, 127.0.0.1:8080 or [::1]:8080"`
	// AdminAddr is the host:port of the admin listener (metrics, health).
	// Unlike every other variable, setting it to the empty string does not
	// fall back to the default: it turns the admin listener off, so the
	// admin endpoints are never exposed by accident on a public address.
	AdminAddr string `env:"ADMIN_ADDR" envDefault:":9090" want:"a host:port such as :9090 or 127.0.0.1:9090, or empty to turn the admin listener off"`
	// Pprof adds Go's profiles (net/http/pprof) under /debug/pprof/ on the
	// admin listener. Off by default: profiles expose internals (command
	// line, code paths, memory contents by type) and a CPU profile costs
	// CPU while it runs.
	Pprof bool `env:"PPROF" envDefault:"false" want:"true or false"`
	// AdminToken lets peers other than loopback see the status page (it
	// lists every client's address) and the profiles, sent as
	// Authorization: Bearer. Empty: loopback peers only (kubectl
	// port-forward). Health and metrics never need it.
	AdminToken string `env:"ADMIN_TOKEN" want:"empty, or a secret of 16 characters or more"`
	// HandshakeTimeout bounds the time a client has to send its whole
	// upgrade request, so idle half-open connections cannot pile up.
	HandshakeTimeout time.Duration `env:"HANDSHAKE_TIMEOUT" envDefault:"10s" want:"a positive duration such as 500ms, 10s or 1m"`
	// HandshakeIdleTimeout bounds each wait for more of the upgrade
	// request, the first byte included, within HandshakeTimeout: a client
	// that stops sending frees its place under the connection limits
	// sooner than the whole handshake's bound.
	HandshakeIdleTimeout time.Duration `env:"HANDSHAKE_IDLE_TIMEOUT" envDefault:"5s" want:"a positive duration such as 1s or 5s, at most SLUICE_HANDSHAKE_TIMEOUT"`
	// MaxHeaderBytes caps the size of a client's upgrade request headers.
	MaxHeaderBytes ByteSize `env:"MAX_HEADER_BYTES" envDefault:"32KiB" want:"a size from 1KiB to 1MiB, such as 8192, 32KiB or 1MiB"`
	// TLSCertFile and TLSKeyFile, set together, make the WebSocket
	// listener serve TLS (wss://) with this PEM certificate chain and key.
	// Both files are reloaded on SIGHUP and when either changes (see
	// package certs); the admin listener stays plain HTTP. Empty serves ws://.
	TLSCertFile string `env:"TLS_CERT_FILE" want:"the path of a PEM certificate chain, set together with SLUICE_TLS_KEY_FILE"`
	// TLSKeyFile is the PEM private key of TLSCertFile.
	TLSKeyFile string `env:"TLS_KEY_FILE" want:"the path of the PEM private key of SLUICE_TLS_CERT_FILE, set together with it"`
	// HTTPPassThrough sends every request on the proxy port that is not a
	// WebSocket upgrade to the upstream's origin (ws:// as http://, wss://
	// as https://), streamed both ways: an app's pages, health checks,
	// POSTs, downloads, SSE and long-polling (Socket.IO's first transport)
	// work through sluice as they do direct. On by default because sluice
	// is a sidecar that owns the app's port; false answers them 426.
	HTTPPassThrough bool `env:"HTTP_PASSTHROUGH" envDefault:"true" want:"true or false"`
	// HTTPResponseTimeout bounds the wait for the upstream's response
	// headers to a passed-through request. Long-polls hold their answer
	// for up to the app's poll interval (Socket.IO: 25 s), so the default
	// is well above it, as nginx's proxy_read_timeout.
	HTTPResponseTimeout time.Duration `env:"HTTP_RESPONSE_TIMEOUT" envDefault:"60s" want:"a positive duration such as 30s or 60s"`
	// ProxyProtocol requires a PROXY protocol header (v1 or v2) at the
	// start of every connection on the proxy port, as a load balancer that
	// speaks it sends (HAProxy send-proxy, AWS NLB, nginx proxy_protocol);
	// the address in it is the client. A connection without one is
	// refused. Off by default: a header from an unexpected peer would
	// let it claim any address.
	ProxyProtocol bool `env:"PROXY_PROTOCOL" envDefault:"false" want:"true or false"`

	// --- upstream ---

	// UpstreamURL is the WebSocket backend every client is proxied to.
	// Load accepts ws, wss, http and https and rewrites http to ws and
	// https to wss, so after Load the scheme is always ws or wss.
	// It is required unless Load is given AllowNoUpstream (the demo
	// runs its own backend); it is then nil when unset.
	UpstreamURL *url.URL `env:"UPSTREAM_URL" want:"a ws://, wss://, http:// or https:// URL with a host and no #fragment, such as ws://backend:8080"`
	// UpstreamDialTimeout bounds connecting to the upstream and completing
	// its WebSocket handshake; the client waits meanwhile.
	UpstreamDialTimeout time.Duration `env:"UPSTREAM_DIAL_TIMEOUT" envDefault:"5s" want:"a positive duration such as 500ms, 5s or 1m"`
	// UpstreamReadBuffer sets SO_RCVBUF on upstream sockets: the kernel
	// buffer that absorbs a burst from the backend while clients are slow.
	// 0 keeps the kernel default.
	UpstreamReadBuffer ByteSize `env:"UPSTREAM_READ_BUFFER" envDefault:"64KiB" want:"0 (kernel default) or a size from 4KiB to 64MiB, such as 64KiB"`
	// UpstreamWriteBuffer sets SO_SNDBUF on upstream sockets, before they
	// connect. The kernel's autotuning grew it to ~4 MB per connection
	// toward a backend that stopped reading, outside every bound; at
	// 128KiB one fast client's throughput to a reading backend stayed
	// within noise of autotuning on loopback, and below 64KiB it
	// collapsed to 3 MB/s (PERFORMANCE.md, "Kernel memory toward a backend
	// that stops reading"). 0 keeps the kernel's autotuning.
	UpstreamWriteBuffer ByteSize `env:"UPSTREAM_WRITE_BUFFER" envDefault:"128KiB" want:"0 (kernel default) or a size from 64KiB to 64MiB, such as 128KiB (smaller starves loopback's 64 KiB segments)"`
	// ClientReadBuffer sets SO_RCVBUF on client sockets once upgraded: it
	// bounds what the kernel holds of what a client sent while its
	// backend is not reading (~1.3 MB per client with autotuning); 16KiB
	// halved one client's throughput, 64KiB did not. 0 keeps the
	// kernel's autotuning.
	ClientReadBuffer ByteSize `env:"CLIENT_READ_BUFFER" envDefault:"64KiB" want:"0 (kernel default) or a size from 4KiB to 64MiB, such as 64KiB"`
	// ClientWriteBuffer is SO_SNDBUF of client sockets. The default bounds
	// the kernel memory a stalled client holds outside the queue ceiling
	// (autotuning lets it grow to tcp_wmem's maximum, 4 MiB by default)
	// and shows slow clients sooner; 0 keeps the kernel's autotuning.
	ClientWriteBuffer ByteSize `env:"CLIENT_WRITE_BUFFER" envDefault:"256KiB" want:"0 (kernel default) or a size from 4KiB to 64MiB, such as 256KiB"`
	// IdlePoll parks the reader of a socket quiet for a second in one
	// shared epoll set (Linux) instead of a goroutine waiting on it: about
	// 8 KiB less per idle connection.
	IdlePoll bool `env:"IDLE_POLL" envDefault:"true" want:"true or false"`
	// UpstreamCloseCode is the close code sent to clients when their
	// upstream fails: 1014 Bad Gateway says what happened, but some client
	// libraries reject it; 1011 Internal Error and 1012 Service Restart are
	// the widely accepted alternatives.
	UpstreamCloseCode int `env:"UPSTREAM_CLOSE_CODE" envDefault:"1014" want:"1011, 1012 or 1014"`
	// UpstreamCAFile is a PEM bundle of the CAs trusted to sign a wss://
	// upstream's certificate, instead of the system roots (a pool of only
	// these CAs). Empty trusts the system roots. Read once at start.
	UpstreamCAFile string `env:"UPSTREAM_CA_FILE" want:"the path of a PEM file of CA certificates, with a wss:// upstream"`
	// UpstreamClientCertFile and UpstreamClientKeyFile, set together, are
	// the certificate sluice presents to a wss:// upstream that requires
	// one (mutual TLS). Read once at start.
	UpstreamClientCertFile string `env:"UPSTREAM_CLIENT_CERT_FILE" want:"the path of a PEM certificate chain, with a wss:// upstream and SLUICE_UPSTREAM_CLIENT_KEY_FILE"`
	// UpstreamClientKeyFile is the PEM private key of UpstreamClientCertFile.
	UpstreamClientKeyFile string `env:"UPSTREAM_CLIENT_KEY_FILE" want:"the path of the PEM private key of SLUICE_UPSTREAM_CLIENT_CERT_FILE, set together with it"`

	// --- limits ---

	// MaxFrameBytes caps the payload of one frame from a client; a client
	// that announces more is closed with 1009 before anything is allocated.
	MaxFrameBytes ByteSize `env:"MAX_FRAME_BYTES" envDefault:"16MiB" want:"a size of at least 125 bytes, such as 65536, 64KiB or 16MiB"`
	// MaxMessageBytes caps the total payload of one (possibly fragmented)
	// message. It may be smaller or larger than MaxFrameBytes.
	MaxMessageBytes ByteSize `env:"MAX_MESSAGE_BYTES" envDefault:"16MiB" want:"a size of at least 125 bytes, such as 65536, 64KiB or 16MiB"`
	// FrameReadTimeout bounds how long a client may take to send one
	// frame once it has started: a client that stalls mid-frame holds a
	// connection and a buffer for nothing, and keepalive cannot catch it
	// while its frame is open. It is evicted (1013). Idle between frames
	// is fine. 0 turns the bound off.
	FrameReadTimeout time.Duration `env:"FRAME_READ_TIMEOUT" envDefault:"30s" want:"0 (off) or a positive duration such as 30s"`
	// UpstreamFrameReadTimeout bounds how long the backend may stop in the
	// middle of a frame: keepalive cannot see it (its pongs would queue
	// behind the open frame) and the client would wait for nothing. The
	// session ends, 1014 to the client after the messages that did
	// arrive. 30s as for clients: a backend's frames come from a process
	// next door, so a stall that long is a wedged backend. 0 turns it off.
	UpstreamFrameReadTimeout time.Duration `env:"UPSTREAM_FRAME_READ_TIMEOUT" envDefault:"30s" want:"0 (off) or a positive duration such as 30s"`
	// WriteTimeout bounds each write batch to a socket; a peer that does not
	// drain its socket within it is closed.
	WriteTimeout time.Duration `env:"WRITE_TIMEOUT" envDefault:"10s" want:"a positive duration such as 500ms, 10s or 1m"`
	// UpstreamWriteTimeout bounds each write batch to an upstream socket,
	// and a client's wait for its backend to take what sluice holds for it
	// (down to half the upstream queue's mark, the kernel's share
	// included): a backend that does not within it has stopped reading, and
	// its sessions end with SLUICE_UPSTREAM_CLOSE_CODE (1014). Longer than
	// WriteTimeout: a wedged backend costs all its clients at once, so a GC
	// pause or a brief overload must not; while it waits, what it holds is
	// bounded (SLUICE_UPSTREAM_WRITE_BUFFER) and counted under the ceiling.
	UpstreamWriteTimeout time.Duration `env:"UPSTREAM_WRITE_TIMEOUT" envDefault:"30s" want:"a positive duration such as 5s, 30s or 1m"`

	// --- admission (checked before the upstream is dialled) ---

	// MaxConnections bounds the client connections open at once, from
	// their accept: requests still arriving count; past it, new upgrades get 503 with a
	// Retry-After. Each costs two file descriptors and some memory: the
	// default protects a process with the usual 1Mi descriptors and a few
	// GiB of memory. 0 means no limit.
	MaxConnections int `env:"MAX_CONNECTIONS" envDefault:"50000" want:"0 (no limit) or a whole number up to 10000000, such as 50000"`
	// MaxConnectionsPerIP bounds the connections of one client address
	// (one /64 for IPv6); past it, 429 with a Retry-After. Behind a load
	// balancer it needs TrustedProxies, or every client shares the
	// balancer's address. 0 means no limit.
	MaxConnectionsPerIP int `env:"MAX_CONNECTIONS_PER_IP" envDefault:"0" want:"0 (no limit) or a whole number up to 10000000, such as 100"`
	// TrustedProxies lists the peers (load balancers) whose
	// X-Forwarded-For or Forwarded names the client (when both name one
	// and they differ, neither is believed), and whose Forwarded and
	// X-Real-IP go upstream; from other peers those are removed. Empty
	// trusts nobody: the client is the socket's peer.
	TrustedProxies []string `env:"TRUSTED_PROXIES" want:"a comma-separated list of CIDRs or IP addresses, such as 10.0.0.0/8,192.168.1.7,fd00::/8"`
	// AllowedOrigins lists the web origins whose pages may open
	// WebSockets through sluice; another Origin gets 403 (cross-site
	// WebSocket hijacking). Requests without an Origin header (not
	// browsers) pass. Empty allows every origin.
	AllowedOrigins []string `env:"ALLOWED_ORIGINS" want:"a comma-separated list of origins scheme://host[:port], where the host may start with *. for every subdomain, such as https://app.example.com,https://*.example.com"`
	// MaxHandshakesPerSecond bounds new upgrades per second (a token
	// bucket whose burst is the same number), so a reconnect storm
	// cannot overload the upstream; past it, 503 with a Retry-After.
	// 0 means no limit.
	MaxHandshakesPerSecond int `env:"MAX_HANDSHAKES_PER_SECOND" envDefault:"0" want:"0 (no limit) or a whole number up to 1000000, such as 500"`
	// UpstreamMaxHandshakes bounds the upgrades under way toward the
	// backend at once, from the dial to its answer (sessions hold none);
	// an upgrade over it waits its turn, fairly across client addresses,
	// rather than being refused. The default bounds a reconnect storm at
	// 64 concurrent upgrades while a healthy backend, answering in a
	// millisecond, could still take 64,000 a second: more than sluice
	// upgrades. 0 turns it off.
	UpstreamMaxHandshakes int `env:"UPSTREAM_MAX_HANDSHAKES" envDefault:"64" want:"0 (off) or a whole number up to 1000000, such as 64"`
	// UpstreamHandshakesPerSecond spaces the upgrades toward the backend
	// evenly (a burst of one); an upgrade waits its turn like one over
	// UpstreamMaxHandshakes. 0 turns it off: the rate a backend takes is
	// its own, unlike the bound on concurrency.
	UpstreamHandshakesPerSecond int `env:"UPSTREAM_HANDSHAKES_PER_SECOND" envDefault:"0" want:"0 (off) or a whole number up to 1000000, such as 500"`
	// QueueTimeout is the longest an upgrade waits for its turn toward
	// the backend; past it, 503 with a Retry-After. The queue holds at
	// most SLUICE_MAX_CONNECTIONS upgrades (10000 without that limit).
	QueueTimeout time.Duration `env:"QUEUE_TIMEOUT" envDefault:"10s" want:"a positive duration up to 10m, such as 10s"`

	// --- inbound protection (what clients send) ---

	// ClientMaxMessagesPerSecond bounds the messages one client may send a
	// second (a token bucket; a fragmented message is one message, pings
	// and pongs cost one each); 0 turns it off.
	ClientMaxMessagesPerSecond int64 `env:"CLIENT_MAX_MESSAGES_PER_SECOND" envDefault:"0" want:"0 (off) or a whole number up to 1000000000, such as 50"`
	// ClientMaxBytesPerSecond bounds the frame payload bytes one client
	// may send a second; 0 turns it off.
	ClientMaxBytesPerSecond ByteSize `env:"CLIENT_MAX_BYTES_PER_SECOND" envDefault:"0" want:"0 (off) or a size per second such as 65536, 64KiB or 1MiB"`
	// ClientRateBurst is how much of each rate a client may send at once
	// after a quiet spell: the buckets hold this long's worth.
	ClientRateBurst time.Duration `env:"CLIENT_RATE_BURST" envDefault:"1s" want:"a positive duration such as 1s or 500ms (how long's worth of each rate a client may send at once)"`
	// ClientRatePolicy is what happens past a client's limit: throttle
	// stops reading its socket until its next frame is due (nothing is
	// lost; TCP pushes back on it), close closes it with 1008.
	ClientRatePolicy RatePolicy `env:"CLIENT_RATE_POLICY" envDefault:"throttle" want:"throttle or close"`
	// ClientThrottleMax closes a client held back without a break for
	// longer than this (1008); 0 never does.
	ClientThrottleMax time.Duration `env:"CLIENT_THROTTLE_MAX" envDefault:"0" want:"0 (no limit) or a positive duration such as 30s"`
	// UpstreamMaxMessagesPerSecond caps the messages of all clients
	// together toward the backend, shared fairly among them; 0 turns it
	// off.
	UpstreamMaxMessagesPerSecond int64 `env:"UPSTREAM_MAX_MESSAGES_PER_SECOND" envDefault:"0" want:"0 (off) or a whole number up to 1000000000, such as 5000"`

	// --- backpressure (per connection and direction) ---

	// Policy is what a queue does when a message arrives above its
	// high-water mark: evict the client, drop the oldest whole messages, or
	// pause the producer until the queue falls to its low-water mark.
	Policy Policy `env:"POLICY" envDefault:"evict" want:"one of evict, drop or pause"`
	// QueueMaxMessages is the high-water mark of a queue in messages.
	QueueMaxMessages int `env:"QUEUE_MAX_MESSAGES" envDefault:"100" want:"a whole number from 1 to 1000000"`
	// QueueMaxBytes is the high-water mark of a queue in payload bytes.
	QueueMaxBytes ByteSize `env:"QUEUE_MAX_BYTES" envDefault:"10MiB" want:"a size of at least 1KiB, such as 65536, 64KiB or 10MiB"`
	// QueueLowWater is the low-water mark as a fraction of both high-water
	// marks: a paused producer resumes once the queue falls below it.
	QueueLowWater float64 `env:"QUEUE_LOW_WATER" envDefault:"0.5" want:"a fraction between 0 and 1, both excluded, such as 0.5"`
	// DropKeepNewest is how many of the newest messages the drop policy
	// keeps when it sheds a backlog.
	DropKeepNewest int `env:"DROP_KEEP_NEWEST" envDefault:"10" want:"a whole number from 1 to SLUICE_QUEUE_MAX_MESSAGES, such as 10"`
	// PauseMax bounds how long the pause policy may block a producer before
	// the connection is closed; 0 lets a pause last forever, so that a
	// client that reads a trickle holds its backend connection still.
	PauseMax time.Duration `env:"PAUSE_MAX" envDefault:"30s" want:"0 (no limit) or a positive duration such as 5s or 1m"`

	// --- global guards (whole process) ---

	// GlobalQueueMaxBytes caps the bytes queued across all connections,
	// either absolutely or as a percentage of the process memory limit
	// (see GlobalQueueLimit.Resolve and MemoryLimit).
	GlobalQueueMaxBytes GlobalQueueLimit `env:"GLOBAL_QUEUE_MAX_BYTES" envDefault:"5%" want:"a positive size such as 512MiB, or a percentage of the memory limit above 0% and up to 100%, such as 5% or 2.5%"`
	// SlowClientAge is how long a client may take nothing while data
	// waits for it before it counts as slow (for the ratio guard, /status
	// and sluice_slow_clients). A deep queue while bytes flow is not slow.
	SlowClientAge time.Duration `env:"SLOW_CLIENT_AGE" envDefault:"5s" want:"a duration from 100ms to 10m, such as 5s"`
	// SlowClientMaxRatio is the largest fraction of connected clients that
	// may be slow at once before sluice starts shedding the slowest.
	SlowClientMaxRatio float64 `env:"SLOW_CLIENT_MAX_RATIO" envDefault:"0.005" want:"a fraction above 0 and at most 1, such as 0.005"`

	// --- keepalive ---

	// PingInterval is how often a client is pinged. 0 turns keepalive off
	// (allowed, but Warnings reports it: dead clients then linger).
	PingInterval time.Duration `env:"PING_INTERVAL" envDefault:"25s" want:"0 (keepalive off) or a positive duration such as 25s"`
	// PongTimeout is how long a ping may wait for its pong before the peer
	// is declared dead. It must be shorter than every non-zero ping interval
	// so that at most one ping is outstanding.
	PongTimeout time.Duration `env:"PONG_TIMEOUT" envDefault:"10s" want:"a positive duration such as 10s"`
	// UpstreamPingInterval is how often the upstream is pinged; 0 (the
	// default) relies on the backend's own keepalive.
	UpstreamPingInterval time.Duration `env:"UPSTREAM_PING_INTERVAL" envDefault:"0" want:"0 (off) or a positive duration such as 30s"`

	// --- lifecycle ---

	// CloseTimeout bounds each close handshake: sending our close frame and
	// waiting for the peer's.
	CloseTimeout time.Duration `env:"CLOSE_TIMEOUT" envDefault:"5s" want:"a positive duration such as 5s"`
	// ShutdownTimeout bounds the whole graceful shutdown after SIGTERM;
	// connections still open when it expires are cut.
	ShutdownTimeout time.Duration `env:"SHUTDOWN_TIMEOUT" envDefault:"30s" want:"a positive duration such as 30s"`
	// DrainDelay is how long sluice keeps serving after SIGTERM (while
	// reporting not-ready) so load balancers stop sending new clients: they
	// learn of the termination seconds after sluice does.
	DrainDelay time.Duration `env:"DRAIN_DELAY" envDefault:"5s" want:"0 or a positive duration such as 5s"`
	// DrainSpread spreads the closing of existing connections over this
	// long, so clients do not all reconnect at the same instant.
	// DrainDelay+DrainSpread must be shorter than ShutdownTimeout.
	DrainSpread time.Duration `env:"DRAIN_SPREAD" envDefault:"0" want:"0 or a positive duration such as 10s"`

	// --- logs ---

	// LogLevel is the minimum level logged. The zero zerolog.Level is
	// Debug, hence the explicit default.
	LogLevel zerolog.Level `env:"LOG_LEVEL" envDefault:"info" want:"one of trace, debug, info, warn, error, fatal, panic or disabled"`
	// LogFormat is json (for machines) or console (for humans at a
	// terminal).
	LogFormat string `env:"LOG_FORMAT" envDefault:"json" want:"json or console"`
	// LogQuery logs the values of clients' query strings. Off by default:
	// browsers cannot set headers on a WebSocket, so apps put tokens in
	// the query, and log lines keep only its keys (?token=REDACTED).
	LogQuery bool `env:"LOG_QUERY" envDefault:"false" want:"true or false"`
}

// Log formats accepted in Config.LogFormat.
const (
	LogFormatJSON    = "json"
	LogFormatConsole = "console"
)

// LoadOption changes what Load requires.
type LoadOption func(*loadOptions)

type loadOptions struct {
	allowNoUpstream bool
}

// AllowNoUpstream lets SLUICE_UPSTREAM_URL be unset, leaving
// Config.UpstreamURL nil; the demo uses it because it starts its own
// backend. A URL that is set is still checked.
func AllowNoUpstream() LoadOption {
	return func(o *loadOptions) { o.allowNoUpstream = true }
}

// Load parses environ (a map like env.ToMap(os.Environ())) and validates it.
// The error lists EVERY problem at once, one per line, each naming the variable (with SLUICE_ prefix), the offending value and what is allowed,
// e.g. `SLUICE_QUEUE_MAX_BYTES="10 potatoes": want a size such as 65536, 64KiB or 10MiB`.
//
// The error is a *Error. Problems are: values that do not parse,
// values out of range, cross-field conflicts (see Validate), a missing
// SLUICE_UPSTREAM_URL (unless AllowNoUpstream), and SLUICE_* variables that
// sluice does not know, with the closest known name suggested. A variable
// set to the empty string takes its default, except SLUICE_ADMIN_ADDR. On
// error the returned Config is the zero value.
func Load(environ map[string]string, opts ...LoadOption) (Config, error) {
	var o loadOptions
	for _, opt := range opts {
		opt(&o)
	}
	if environ == nil {
		// env.Options treats a nil Environment as "use os.Environ()".
		environ = map[string]string{}
	}
	c := newChecker(environ)

	cfg, err := env.ParseAsWithOptions[Config](env.Options{Prefix: Prefix, Environment: environ})
	if err != nil {
		var agg env.AggregateError
		if !errors.As(err, &agg) {
			return Config{}, fmt.Errorf("config: %w", err)
		}
		for _, e := range agg.Errors {
			c.parseError(e)
		}
	}

	if v, ok := environ[Prefix+"ADMIN_ADDR"]; ok && v == "" {
		cfg.AdminAddr = ""
	}
	if u := cfg.UpstreamURL; u != nil && !c.bad["UpstreamURL"] {
		switch u.Scheme {
		case "http":
			u.Scheme = "ws"
		case "https":
			u.Scheme = "wss"
		}
	}
	if !c.bad["LogFormat"] {
		cfg.LogFormat = strings.ToLower(cfg.LogFormat)
	}
	if cfg.UpstreamURL == nil && !o.allowNoUpstream && !c.bad["UpstreamURL"] {
		f := fieldsByName["UpstreamURL"]
		c.add(Problem{Var: f.key, Msg: "required; want " + f.want, order: f.index})
		c.bad["UpstreamURL"] = true
	}

	cfg.check(c)
	c.unknownVars(environ)

	if len(c.problems) > 0 {
		return Config{}, c.err()
	}
	return cfg, nil
}

// Validate checks every field and the rules between fields (pong timeout
// shorter than the ping intervals, drop and slow-client depths within the
// queue, drain within the shutdown timeout) and returns a *Error that
// lists every problem, or nil. Load applies the same rules; call
// Validate yourself on a Config built or changed in code. A nil UpstreamURL passes: Load enforces the
// requirement.
func (cfg Config) Validate() error {
	c := newChecker(nil)
	cfg.check(c)
	if len(c.problems) > 0 {
		return c.err()
	}
	return nil
}

// Warnings lists settings that are allowed but probably unwise, one
// sentence each. Main logs them at warn level after loading.
func (cfg Config) Warnings() []string {
	var w []string
	if cfg.PingInterval == 0 {
		w = append(w, Prefix+"PING_INTERVAL=0 turns keepalive off: a client that vanishes without closing is only noticed when a write to it fails or times out")
	}
	if cfg.AdminToken != "" && len(cfg.AdminToken) < 16 {
		w = append(w, Prefix+"ADMIN_TOKEN is shorter than 16 characters: easy to guess")
	}
	if cfg.Policy == PolicyPause && cfg.PauseMax == 0 {
		w = append(w, Prefix+"POLICY=pause with "+Prefix+"PAUSE_MAX=0: a client that stops reading can stall its upstream forever")
	}
	if cfg.ProxyProtocol && len(listEntries(cfg.TrustedProxies)) == 0 {
		w = append(w, Prefix+"PROXY_PROTOCOL=true without "+Prefix+"TRUSTED_PROXIES: any peer that reaches the port can claim any client address; list the load balancers")
	}
	return w
}

// check runs the per-field and cross-field rules, skipping every rule that
// involves a field c already knows to be bad.
func (cfg Config) check(c *checker) {
	c.field("ListenAddr", ValidHostPort(cfg.ListenAddr), cfg.ListenAddr)
	c.field("AdminAddr", cfg.AdminAddr == "" || ValidHostPort(cfg.AdminAddr), cfg.AdminAddr)
	c.field("HandshakeTimeout", cfg.HandshakeTimeout > 0, cfg.HandshakeTimeout)
	c.field("HTTPResponseTimeout", cfg.HTTPResponseTimeout > 0, cfg.HTTPResponseTimeout)
	c.field("HandshakeIdleTimeout", cfg.HandshakeIdleTimeout > 0, cfg.HandshakeIdleTimeout)
	c.field("MaxHeaderBytes", cfg.MaxHeaderBytes >= KiB && cfg.MaxHeaderBytes <= MiB, cfg.MaxHeaderBytes)

	if cfg.UpstreamURL != nil {
		c.field("UpstreamURL", validUpstream(cfg.UpstreamURL), cfg.UpstreamURL.String())
	}
	c.field("UpstreamDialTimeout", cfg.UpstreamDialTimeout > 0, cfg.UpstreamDialTimeout)
	c.field("UpstreamReadBuffer", cfg.UpstreamReadBuffer == 0 ||
		(cfg.UpstreamReadBuffer >= 4*KiB && cfg.UpstreamReadBuffer <= 64*MiB), cfg.UpstreamReadBuffer)
	c.field("UpstreamWriteBuffer", cfg.UpstreamWriteBuffer == 0 ||
		(cfg.UpstreamWriteBuffer >= 64*KiB && cfg.UpstreamWriteBuffer <= 64*MiB), cfg.UpstreamWriteBuffer)
	c.field("ClientReadBuffer", cfg.ClientReadBuffer == 0 ||
		(cfg.ClientReadBuffer >= 4*KiB && cfg.ClientReadBuffer <= 64*MiB), cfg.ClientReadBuffer)
	c.field("ClientWriteBuffer", cfg.ClientWriteBuffer == 0 ||
		(cfg.ClientWriteBuffer >= 4*KiB && cfg.ClientWriteBuffer <= 64*MiB), cfg.ClientWriteBuffer)
	c.field("UpstreamCloseCode", slices.Contains([]int{1011, 1012, 1014}, cfg.UpstreamCloseCode), cfg.UpstreamCloseCode)

	c.field("MaxFrameBytes", cfg.MaxFrameBytes >= 125, cfg.MaxFrameBytes)
	c.field("MaxMessageBytes", cfg.MaxMessageBytes >= 125, cfg.MaxMessageBytes)
	c.field("FrameReadTimeout", cfg.FrameReadTimeout >= 0, cfg.FrameReadTimeout)
	c.field("UpstreamFrameReadTimeout", cfg.UpstreamFrameReadTimeout >= 0, cfg.UpstreamFrameReadTimeout)
	c.field("WriteTimeout", cfg.WriteTimeout > 0, cfg.WriteTimeout)
	c.field("UpstreamWriteTimeout", cfg.UpstreamWriteTimeout > 0, cfg.UpstreamWriteTimeout)

	c.field("MaxConnections", cfg.MaxConnections >= 0 && cfg.MaxConnections <= 10_000_000, cfg.MaxConnections)
	c.field("MaxConnectionsPerIP", cfg.MaxConnectionsPerIP >= 0 && cfg.MaxConnectionsPerIP <= 10_000_000, cfg.MaxConnectionsPerIP)
	c.list("TrustedProxies", cfg.TrustedProxies, func(s string) error { _, err := frontdoor.ParseTrustedProxy(s); return err })
	c.list("AllowedOrigins", cfg.AllowedOrigins, frontdoor.CheckOriginPattern)
	c.field("MaxHandshakesPerSecond", cfg.MaxHandshakesPerSecond >= 0 && cfg.MaxHandshakesPerSecond <= 1_000_000, cfg.MaxHandshakesPerSecond)
	c.field("UpstreamMaxHandshakes", cfg.UpstreamMaxHandshakes >= 0 && cfg.UpstreamMaxHandshakes <= 1_000_000, cfg.UpstreamMaxHandshakes)
	c.field("UpstreamHandshakesPerSecond", cfg.UpstreamHandshakesPerSecond >= 0 && cfg.UpstreamHandshakesPerSecond <= 1_000_000, cfg.UpstreamHandshakesPerSecond)
	c.field("QueueTimeout", cfg.QueueTimeout > 0 && cfg.QueueTimeout <= 10*time.Minute, cfg.QueueTimeout)

	c.field("ClientMaxMessagesPerSecond", cfg.ClientMaxMessagesPerSecond >= 0 && cfg.ClientMaxMessagesPerSecond <= 1_000_000_000, cfg.ClientMaxMessagesPerSecond)
	c.field("ClientMaxBytesPerSecond", cfg.ClientMaxBytesPerSecond >= 0, cfg.ClientMaxBytesPerSecond)
	c.field("ClientRateBurst", cfg.ClientRateBurst > 0 && cfg.ClientRateBurst <= time.Hour, cfg.ClientRateBurst)
	c.field("ClientRatePolicy", cfg.ClientRatePolicy.valid(), cfg.ClientRatePolicy)
	c.field("ClientThrottleMax", cfg.ClientThrottleMax >= 0, cfg.ClientThrottleMax)
	c.field("UpstreamMaxMessagesPerSecond", cfg.UpstreamMaxMessagesPerSecond >= 0 && cfg.UpstreamMaxMessagesPerSecond <= 1_000_000_000, cfg.UpstreamMaxMessagesPerSecond)

	c.field("Policy", cfg.Policy.valid(), cfg.Policy)
	c.field("QueueMaxMessages", cfg.QueueMaxMessages >= 1 && cfg.QueueMaxMessages <= 1_000_000, cfg.QueueMaxMessages)
	c.field("QueueMaxBytes", cfg.QueueMaxBytes >= KiB, cfg.QueueMaxBytes)
	c.field("QueueLowWater", cfg.QueueLowWater > 0 && cfg.QueueLowWater < 1, cfg.QueueLowWater) // false for NaN
	c.field("DropKeepNewest", cfg.DropKeepNewest >= 1, cfg.DropKeepNewest)
	c.field("PauseMax", cfg.PauseMax >= 0, cfg.PauseMax)

	c.field("GlobalQueueMaxBytes", cfg.GlobalQueueMaxBytes.valid(), cfg.GlobalQueueMaxBytes)
	c.field("SlowClientAge", cfg.SlowClientAge >= 100*time.Millisecond && cfg.SlowClientAge <= 10*time.Minute, cfg.SlowClientAge)
	c.field("SlowClientMaxRatio", cfg.SlowClientMaxRatio > 0 && cfg.SlowClientMaxRatio <= 1, cfg.SlowClientMaxRatio)

	c.field("PingInterval", cfg.PingInterval >= 0, cfg.PingInterval)
	c.field("PongTimeout", cfg.PongTimeout > 0, cfg.PongTimeout)
	c.field("UpstreamPingInterval", cfg.UpstreamPingInterval >= 0, cfg.UpstreamPingInterval)

	c.field("CloseTimeout", cfg.CloseTimeout > 0, cfg.CloseTimeout)
	c.field("ShutdownTimeout", cfg.ShutdownTimeout > 0, cfg.ShutdownTimeout)
	c.field("DrainDelay", cfg.DrainDelay >= 0, cfg.DrainDelay)
	c.field("DrainSpread", cfg.DrainSpread >= 0, cfg.DrainSpread)

	c.field("LogLevel", validLogLevel(cfg.LogLevel), cfg.LogLevel)
	c.field("LogFormat", cfg.LogFormat == LogFormatJSON || cfg.LogFormat == LogFormatConsole, cfg.LogFormat)
	cfg.checkTLS(c) // tls.go: pairs, scheme, and that the files load

	// Cross-field rules.
	c.cross(cfg.DropKeepNewest <= cfg.QueueMaxMessages, "DropKeepNewest", cfg.DropKeepNewest,
		"QueueMaxMessages", cfg.QueueMaxMessages, "want at most %s")
	c.cross(cfg.PingInterval == 0 || cfg.PongTimeout < cfg.PingInterval, "PongTimeout", cfg.PongTimeout,
		"PingInterval", cfg.PingInterval, "want a duration shorter than %s")
	c.cross(cfg.UpstreamPingInterval == 0 || cfg.PongTimeout < cfg.UpstreamPingInterval, "PongTimeout", cfg.PongTimeout,
		"UpstreamPingInterval", cfg.UpstreamPingInterval, "want a duration shorter than %s")
	// Written without the sum, which could overflow; both terms are >= 0 here.
	drainOK := cfg.DrainDelay < cfg.ShutdownTimeout && cfg.DrainSpread < cfg.ShutdownTimeout-cfg.DrainDelay
	if !c.anyBad("DrainDelay", "DrainSpread", "ShutdownTimeout") && !drainOK {
		f := fieldsByName["DrainDelay"]
		c.add(Problem{
			Var:   f.key + "+" + fieldsByName["DrainSpread"].key,
			Value: c.show("DrainDelay", cfg.DrainDelay) + "+" + c.show("DrainSpread", cfg.DrainSpread),
			Msg:   "want a total shorter than " + c.ref("ShutdownTimeout", cfg.ShutdownTimeout),
			order: f.index,
		})
	}
}

// ValidHostPort reports whether addr is a host:port with a numeric port
// (the host may be empty, as in :8080).
func ValidHostPort(addr string) bool {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	_, err = strconv.ParseUint(port, 10, 16)
	return err == nil
}

// validUpstream wants ws or wss: Load has already mapped http and
// https. RFC 6455 §3 forbids fragments in WebSocket URIs.
func validUpstream(u *url.URL) bool {
	return (u.Scheme == "ws" || u.Scheme == "wss") && u.Hostname() != "" && u.Fragment == "" && u.Opaque == ""
}

func validLogLevel(l zerolog.Level) bool {
	// ParseLevel also accepts "" (NoLevel) and numbers; keep the named
	// levels only.
	return (l >= zerolog.TraceLevel && l <= zerolog.PanicLevel) || l == zerolog.Disabled
}

// Problem is one thing wrong with the configuration.
type Problem struct {
	// Var names the variable(s), with the SLUICE_ prefix.
	Var string
	// Value is the offending value as the user wrote it (URL passwords
	// redacted), or the effective value when it came from a default.
	Value string
	// Msg says what is allowed, usually starting with "want".
	Msg string

	order int // position of Var in Config, to list problems in field order
}

func (p Problem) String() string {
	if p.Var == "" {
		return p.Msg
	}
	return fmt.Sprintf("%s=%q: %s", p.Var, p.Value, p.Msg)
}

// Error is every problem Load or Validate found. Its message
// has one problem per line, in the order of the fields of Config, with
// unknown variables last.
type Error struct {
	Problems []Problem
}

func (e *Error) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}
