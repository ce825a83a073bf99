package proxy

import (
	"errors"
	"net/url"
	"time"

	"github.com/gobwas/ws"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"sluice/frame"
	"sluice/keepalive"
	"sluice/limiter"
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

	DialTimeout      time.Duration // upstream connect and handshake; default 5s
	HandshakeTimeout time.Duration // client request headers; default 10s
	WriteTimeout     time.Duration // one write to either socket; default 10s
	CloseTimeout     time.Duration // a close handshake, both legs; default 5s
	DrainSpread      time.Duration // Shutdown's 1001s are spread over this; 0: all at once
	MaxHeaderBytes   int           // client request headers; default 32 KiB

	// MaxFrameBytes and MaxMessageBytes bound what a client may send
	// (1009 past them); 0 means no bound. The upstream is trusted.
	MaxFrameBytes   int64
	MaxMessageBytes int64

	// UpstreamFailureCode is the close code clients get when the upstream
	// fails: 1014 by default; 1011 or 1012 for fleets whose client library
	// rejects 1014.
	UpstreamFailureCode ws.StatusCode
	// UpstreamReadBuffer is SO_RCVBUF for upstream sockets, so that a
	// paused reader pushes back on the backend quickly; 0 keeps the
	// kernel's default.
	UpstreamReadBuffer int
	// ClientWriteBuffer is SO_SNDBUF for client sockets. The kernel's
	// autotuned send buffer can hold megabytes for a stalled client
	// before its queue in sluice even starts to grow; a fixed buffer makes
	// sluice see a slow client sooner and bounds that kernel memory. 0
	// keeps the kernel's default.
	ClientWriteBuffer int

	// Queue bounds each client's downstream queue.
	Queue limiter.Config
	// Budget bounds all queues together.
	Budget limiter.BudgetConfig

	// Keepalive pings clients; UpstreamKeepalive pings the upstream.
	Keepalive         keepalive.Config
	UpstreamKeepalive keepalive.Config
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
	def(&o.WriteTimeout, 10*time.Second)
	def(&o.CloseTimeout, 5*time.Second)
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
	if q.SlowDepth <= 0 {
		q.SlowDepth = min(5, q.MaxMessages)
	}
	return nil
}
