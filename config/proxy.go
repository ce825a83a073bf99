package config

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"time"

	"github.com/gobwas/ws"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/frontdoor"
	"github.com/sluice-proxy/sluice/keepalive"
	"github.com/sluice-proxy/sluice/limiter"
	"github.com/sluice-proxy/sluice/proxy"
)

// ProxyOptions is the one mapping from the configuration to the proxy's
// options: sluice's binary, the demo and the end-to-end tests all build
// their proxy through it, so a setting has its default and its checks here
// and nowhere else. proxy.Options keeps zero-value defaults of its own for
// library users; every field set here overrides them.
//
// cfg must have passed Load or Validate. ProxyOptions reads the upstream's
// TLS files (SLUICE_UPSTREAM_CA_FILE and the client pair) and takes the
// global queue ceiling from the process memory limit (MemoryLimit) when it
// is a percentage. log and reg become Options.Logger and Options.Registerer.
func (cfg Config) ProxyOptions(log zerolog.Logger, reg prometheus.Registerer) (proxy.Options, error) {
	if cfg.UpstreamURL == nil {
		return proxy.Options{}, errors.New("config: no upstream (" + Prefix + "UPSTREAM_URL)")
	}
	policy, err := limiter.ParsePolicy(string(cfg.Policy))
	if err != nil {
		return proxy.Options{}, fmt.Errorf("%sPOLICY=%q: %w", Prefix, cfg.Policy, err)
	}
	ratePolicy, err := limiter.ParseRatePolicy(string(cfg.ClientRatePolicy))
	if err != nil {
		return proxy.Options{}, fmt.Errorf("%sCLIENT_RATE_POLICY=%q: %w", Prefix, cfg.ClientRatePolicy, err)
	}
	upTLS, err := upstreamTLSConfig(cfg)
	if err != nil {
		return proxy.Options{}, err
	}
	return proxy.Options{
		Upstream:             cfg.UpstreamURL,
		Logger:               log,
		Registerer:           reg,
		LogQuery:             cfg.LogQuery,
		DialTimeout:          cfg.UpstreamDialTimeout,
		HandshakeTimeout:     cfg.HandshakeTimeout,
		HandshakeIdleTimeout: min(cfg.HandshakeIdleTimeout, cfg.HandshakeTimeout),
		WriteTimeout:         cfg.WriteTimeout,
		CloseTimeout:         cfg.CloseTimeout,
		DrainSpread:          cfg.DrainSpread,
		MaxHeaderBytes:       int(cfg.MaxHeaderBytes),
		MaxFrameBytes:        int64(cfg.MaxFrameBytes),
		MaxMessageBytes:      int64(cfg.MaxMessageBytes),
		UpstreamFailureCode:  ws.StatusCode(cfg.UpstreamCloseCode),
		UpstreamTLS:          upTLS,
		UpstreamReadBuffer:   int(cfg.UpstreamReadBuffer),
		ClientWriteBuffer:    int(cfg.ClientWriteBuffer),
		UpstreamWriteBuffer:  int(cfg.UpstreamWriteBuffer),
		ClientReadBuffer:     int(cfg.ClientReadBuffer),
		UpstreamWriteTimeout: cfg.UpstreamWriteTimeout,
		NoIdlePoll:           !cfg.IdlePoll,
		HTTPPassThrough:      cfg.HTTPPassThrough,
		HTTPResponseTimeout:  cfg.HTTPResponseTimeout,
		ProxyProtocol:        cfg.ProxyProtocol,

		FrameReadTimeout:         cfg.FrameReadTimeout,
		UpstreamFrameReadTimeout: cfg.UpstreamFrameReadTimeout,
		MaxConnections:           cfg.MaxConnections,
		MaxConnectionsPerIP:      cfg.MaxConnectionsPerIP,
		TrustedProxies:           trustedProxies(cfg.TrustedProxies),
		AllowedOrigins:           listEntries(cfg.AllowedOrigins),
		MaxHandshakesPerSecond:   cfg.MaxHandshakesPerSecond,

		UpstreamMaxHandshakes:       cfg.UpstreamMaxHandshakes,
		UpstreamHandshakesPerSecond: cfg.UpstreamHandshakesPerSecond,
		UpstreamQueueTimeout:        cfg.QueueTimeout,

		ClientRate: proxy.RateLimit{
			MessagesPerSecond: cfg.ClientMaxMessagesPerSecond,
			BytesPerSecond:    int64(cfg.ClientMaxBytesPerSecond),
			Burst:             cfg.ClientRateBurst,
			Policy:            ratePolicy,
			ThrottleMax:       cfg.ClientThrottleMax,
		},
		UpstreamMaxMessagesPerSecond: cfg.UpstreamMaxMessagesPerSecond,

		Queue: limiter.Config{
			Policy:      policy,
			MaxMessages: cfg.QueueMaxMessages,
			MaxBytes:    int64(cfg.QueueMaxBytes),
			LowWater:    cfg.QueueLowWater,
			KeepNewest:  cfg.DropKeepNewest,
			PauseMax:    cfg.PauseMax,
			SlowAge:     cfg.SlowClientAge,
		},
		Budget: limiter.BudgetConfig{
			Ceiling:   cfg.GlobalQueueMaxBytes.Resolve(MemoryLimit()),
			SlowRatio: cfg.SlowClientMaxRatio,
		},
		Keepalive:         keepalive.Config{Interval: cfg.PingInterval, Timeout: cfg.PongTimeout},
		UpstreamKeepalive: keepalive.Config{Interval: cfg.UpstreamPingInterval, Timeout: cfg.PongTimeout},
	}, nil
}

// trustedProxies parses SLUICE_TRUSTED_PROXIES, which check has accepted
// entry by entry.
func trustedProxies(entries []string) []netip.Prefix {
	var out []netip.Prefix
	for _, e := range listEntries(entries) {
		if p, err := frontdoor.ParseTrustedProxy(e); err == nil {
			out = append(out, p)
		}
	}
	return out
}

// Logger is the logger SLUICE_LOG_LEVEL and SLUICE_LOG_FORMAT describe,
// writing to w. Its lines carry the time to the millisecond; durations are
// logged as seconds in fields named *_seconds.
func (cfg Config) Logger(w io.Writer) zerolog.Logger {
	if cfg.LogFormat == LogFormatConsole {
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: "15:04:05.000"}
	}
	return zerolog.New(w).Level(cfg.LogLevel).Hook(millisTimestamp{})
}

// logTimeFormat is RFC 3339 with milliseconds, always three digits so
// that lines sort as text.
const logTimeFormat = "2006-01-02T15:04:05.000Z07:00"

// millisTimestamp stamps each line with the time to the millisecond.
// zerolog's own Timestamp() formats with its package-level
// TimeFieldFormat, to the second by default; this leaves that global
// alone.
type millisTimestamp struct{}

func (millisTimestamp) Run(e *zerolog.Event, _ zerolog.Level, _ string) {
	var buf [len(logTimeFormat) + 8]byte
	e.Bytes(zerolog.TimestampFieldName, time.Now().AppendFormat(buf[:0], logTimeFormat))
}
