package config

import (
	"bytes"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/keepalive"
	"github.com/sluice-proxy/sluice/limiter"
	"github.com/sluice-proxy/sluice/proxy"
)

// TestProxyOptions: every setting reaches the proxy's options through the
// one mapping, with its unit converted.
func TestProxyOptions(t *testing.T) {
	t.Parallel()
	cfg, err := Load(environ(
		"SLUICE_UPSTREAM_URL", "https://backend:8443/socket",
		"SLUICE_UPSTREAM_DIAL_TIMEOUT", "3s",
		"SLUICE_HANDSHAKE_TIMEOUT", "4s",
		"SLUICE_HTTP_PASSTHROUGH", "false",
		"SLUICE_HTTP_RESPONSE_TIMEOUT", "11s",
		"SLUICE_PROXY_PROTOCOL", "true",
		"SLUICE_WRITE_TIMEOUT", "6s",
		"SLUICE_CLOSE_TIMEOUT", "2s",
		"SLUICE_SHUTDOWN_TIMEOUT", "60s",
		"SLUICE_DRAIN_SPREAD", "7s",
		"SLUICE_MAX_HEADER_BYTES", "8KiB",
		"SLUICE_MAX_FRAME_BYTES", "1MiB",
		"SLUICE_MAX_MESSAGE_BYTES", "2MiB",
		"SLUICE_UPSTREAM_CLOSE_CODE", "1012",
		"SLUICE_UPSTREAM_READ_BUFFER", "8KiB",
		"SLUICE_CLIENT_WRITE_BUFFER", "128KiB",
		"SLUICE_IDLE_POLL", "false",
		"SLUICE_FRAME_READ_TIMEOUT", "9s",
		"SLUICE_MAX_CONNECTIONS", "77",
		"SLUICE_MAX_CONNECTIONS_PER_IP", "5",
		"SLUICE_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.7,",
		"SLUICE_ALLOWED_ORIGINS", "https://app.example.com, https://*.example.com",
		"SLUICE_MAX_HANDSHAKES_PER_SECOND", "50",
		"SLUICE_UPSTREAM_MAX_HANDSHAKES", "12",
		"SLUICE_UPSTREAM_HANDSHAKES_PER_SECOND", "300",
		"SLUICE_QUEUE_TIMEOUT", "3s",
		"SLUICE_CLIENT_MAX_MESSAGES_PER_SECOND", "60",
		"SLUICE_CLIENT_MAX_BYTES_PER_SECOND", "64KiB",
		"SLUICE_CLIENT_RATE_BURST", "3s",
		"SLUICE_CLIENT_RATE_POLICY", "Close",
		"SLUICE_CLIENT_THROTTLE_MAX", "12s",
		"SLUICE_UPSTREAM_MAX_MESSAGES_PER_SECOND", "5000",
		"SLUICE_POLICY", "PAUSE",
		"SLUICE_QUEUE_MAX_MESSAGES", "40",
		"SLUICE_QUEUE_MAX_BYTES", "1MiB",
		"SLUICE_QUEUE_LOW_WATER", "0.25",
		"SLUICE_DROP_KEEP_NEWEST", "3",
		"SLUICE_PAUSE_MAX", "11s",
		"SLUICE_GLOBAL_QUEUE_MAX_BYTES", "64MiB",
		"SLUICE_SLOW_CLIENT_AGE", "4s",
		"SLUICE_SLOW_CLIENT_MAX_RATIO", "0.5",
		"SLUICE_PING_INTERVAL", "20s",
		"SLUICE_PONG_TIMEOUT", "5s",
		"SLUICE_UPSTREAM_PING_INTERVAL", "30s",
	))
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	o, err := cfg.ProxyOptions(zerolog.Nop(), reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name      string
		got, want any
	}{
		{"Upstream", o.Upstream.String(), "wss://backend:8443/socket"},
		{"Registerer", o.Registerer, prometheus.Registerer(reg)},
		{"DialTimeout", o.DialTimeout, 3 * time.Second},
		{"HandshakeTimeout", o.HandshakeTimeout, 4 * time.Second},
		{"WriteTimeout", o.WriteTimeout, 6 * time.Second},
		{"CloseTimeout", o.CloseTimeout, 2 * time.Second},
		{"DrainSpread", o.DrainSpread, 7 * time.Second},
		{"MaxHeaderBytes", o.MaxHeaderBytes, 8 << 10},
		{"MaxFrameBytes", o.MaxFrameBytes, int64(1 << 20)},
		{"MaxMessageBytes", o.MaxMessageBytes, int64(2 << 20)},
		{"UpstreamFailureCode", int(o.UpstreamFailureCode), 1012},
		{"UpstreamTLS", o.UpstreamTLS == nil, true},
		{"UpstreamReadBuffer", o.UpstreamReadBuffer, 8 << 10},
		{"ClientWriteBuffer", o.ClientWriteBuffer, 128 << 10},
		{"NoIdlePoll", o.NoIdlePoll, true},
		{"HTTPPassThrough", o.HTTPPassThrough, false},
		{"HTTPResponseTimeout", o.HTTPResponseTimeout, 11 * time.Second},
		{"ProxyProtocol", o.ProxyProtocol, true},
		{"ClientRate", o.ClientRate, proxy.RateLimit{MessagesPerSecond: 60, BytesPerSecond: 64 << 10, Burst: 3 * time.Second, Policy: limiter.CloseOverLimit, ThrottleMax: 12 * time.Second}},
		{"UpstreamMaxMessagesPerSecond", o.UpstreamMaxMessagesPerSecond, int64(5000)},
		{"FrameReadTimeout", o.FrameReadTimeout, 9 * time.Second},
		{"MaxConnections", o.MaxConnections, 77},
		{"MaxConnectionsPerIP", o.MaxConnectionsPerIP, 5},
		{"TrustedProxies", len(o.TrustedProxies), 2},
		{"AllowedOrigins", strings.Join(o.AllowedOrigins, " "), "https://app.example.com https://*.example.com"},
		{"MaxHandshakesPerSecond", o.MaxHandshakesPerSecond, 50},
		{"UpstreamMaxHandshakes", o.UpstreamMaxHandshakes, 12},
		{"UpstreamHandshakesPerSecond", o.UpstreamHandshakesPerSecond, 300},
		{"UpstreamQueueTimeout", o.UpstreamQueueTimeout, 3 * time.Second},
		{"Queue", o.Queue, limiter.Config{Policy: limiter.Pause, MaxMessages: 40, MaxBytes: 1 << 20, LowWater: 0.25,
			KeepNewest: 3, PauseMax: 11 * time.Second, SlowAge: 4 * time.Second}},
		{"Budget.Ceiling", o.Budget.Ceiling, int64(64 << 20)},
		{"Budget.SlowRatio", o.Budget.SlowRatio, 0.5},
		{"Keepalive", o.Keepalive, keepalive.Config{Interval: 20 * time.Second, Timeout: 5 * time.Second}},
		{"UpstreamKeepalive", o.UpstreamKeepalive, keepalive.Config{Interval: 30 * time.Second, Timeout: 5 * time.Second}},
	} {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
}

// TestProxyOptionsErrors: a Config built in code that Validate would have
// refused fails the mapping with an error naming the variable, instead of
// a silent default.
func TestProxyOptionsErrors(t *testing.T) {
	t.Parallel()
	cfg, err := Load(environ())
	if err != nil {
		t.Fatal(err)
	}
	bad := cfg
	bad.Policy = "sometimes"
	if _, err := bad.ProxyOptions(zerolog.Nop(), nil); err == nil || !strings.Contains(err.Error(), `SLUICE_POLICY="sometimes"`) {
		t.Errorf("unknown policy: %v; want an error naming SLUICE_POLICY", err)
	}
	bad = cfg
	bad.UpstreamURL = nil
	if _, err := bad.ProxyOptions(zerolog.Nop(), nil); err == nil || !strings.Contains(err.Error(), "SLUICE_UPSTREAM_URL") {
		t.Errorf("no upstream: %v; want an error naming SLUICE_UPSTREAM_URL", err)
	}
}

// mustProxyOptions maps c, panicking on an error: for table entries that
// read one field of the result.
func mustProxyOptions(c Config) proxy.Options {
	o, err := c.ProxyOptions(zerolog.Nop(), nil)
	if err != nil {
		panic(err)
	}
	return o
}

// TestLoggerTime: both log formats stamp lines to the millisecond.
func TestLoggerTime(t *testing.T) {
	for format, want := range map[string]*regexp.Regexp{
		LogFormatJSON:    regexp.MustCompile(`^\{"level":"info","time":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d)","message":"hello"\}\n$`),
		LogFormatConsole: regexp.MustCompile(`^\d\d:\d\d:\d\d\.\d{3} INF hello\n$`),
	} {
		cfg, err := Load(environ("SLUICE_LOG_FORMAT", format))
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		log := cfg.Logger(&buf)
		log.Info().Msg("hello")
		got := buf.String()
		if format == LogFormatConsole {
			got = regexp.MustCompile(`\x1b\[[0-9;]*m`).ReplaceAllString(got, "")
		}
		if !want.MatchString(got) {
			t.Errorf("%s: %q; want a match for %s", format, got, want)
		}
	}
}
