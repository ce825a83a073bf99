package config

import (
	"bufio"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"math"
	"net/url"
	"os"
	"os/exec"
	"reflect"
	"runtime/debug"
	"strings"
	"testing"
	"time"

	"github.com/caarlos0/env/v11"
	"github.com/rs/zerolog"
)

const testUpstream = "ws://backend:8080/socket"

// environ returns an environment with an upstream and kv (key, value,
// key, value...) added; a key with the value "<unset>" is removed.
func environ(kv ...string) map[string]string {
	m := map[string]string{"SLUICE_UPSTREAM_URL": testUpstream}
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] == "<unset>" {
			delete(m, kv[i])
			continue
		}
		m[kv[i]] = kv[i+1]
	}
	return m
}

// problemLines returns the lines of a Load error, failing the test
// when err is not a *Error with one problem per line.
func problemLines(t *testing.T, err error) []string {
	t.Helper()
	if err == nil {
		t.Fatal("Load succeeded, want an error")
	}
	var ce *Error
	if !errors.As(err, &ce) {
		t.Fatalf("error %T %q is not a *Error", err, err)
	}
	lines := strings.Split(err.Error(), "\n")
	if len(lines) != len(ce.Problems) {
		t.Fatalf("error has %d lines for %d problems:\n%s", len(lines), len(ce.Problems), err)
	}
	return lines
}

// wantLine is the message for a value that breaks the rule of its own
// variable: the variable, the value and the allowed form of its want tag.
func wantLine(t *testing.T, key, value string) string {
	t.Helper()
	for _, f := range configFields {
		if f.key == key {
			return fmt.Sprintf("%s=%q: want %s", key, value, f.want)
		}
	}
	t.Fatalf("no variable %s", key)
	return ""
}

func mustURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// defaultConfig is the documented default configuration with testUpstream.
func defaultConfig(t *testing.T) Config {
	return Config{
		ListenAddr:               ":8080",
		AdminAddr:                ":9090",
		Pprof:                    false,
		HandshakeTimeout:         10 * time.Second,
		HandshakeIdleTimeout:     5 * time.Second,
		MaxHeaderBytes:           32 * KiB,
		HTTPPassThrough:          true,
		HTTPResponseTimeout:      60 * time.Second,
		UpstreamURL:              mustURL(t, testUpstream),
		UpstreamDialTimeout:      5 * time.Second,
		UpstreamReadBuffer:       64 * KiB,
		UpstreamWriteBuffer:      128 * KiB,
		ClientReadBuffer:         64 * KiB,
		ClientWriteBuffer:        256 * KiB,
		IdlePoll:                 true,
		UpstreamCloseCode:        1014,
		MaxFrameBytes:            16 * MiB,
		MaxMessageBytes:          16 * MiB,
		FrameReadTimeout:         30 * time.Second,
		UpstreamFrameReadTimeout: 30 * time.Second,
		WriteTimeout:             10 * time.Second,
		UpstreamWriteTimeout:     30 * time.Second,
		MaxConnections:           50000,
		UpstreamMaxHandshakes:    64,
		QueueTimeout:             10 * time.Second,
		ClientRateBurst:          time.Second,
		ClientRatePolicy:         RateThrottle,
		Policy:                   PolicyEvict,
		QueueMaxMessages:         100,
		QueueMaxBytes:            10 * MiB,
		QueueLowWater:            0.5,
		DropKeepNewest:           10,
		PauseMax:                 30 * time.Second,
		GlobalQueueMaxBytes:      GlobalQueueLimit{Percent: 5},
		SlowClientAge:            5 * time.Second,
		SlowClientMaxRatio:       0.005,
		PingInterval:             25 * time.Second,
		PongTimeout:              10 * time.Second,
		UpstreamPingInterval:     0,
		CloseTimeout:             5 * time.Second,
		ShutdownTimeout:          30 * time.Second,
		DrainDelay:               5 * time.Second,
		DrainSpread:              0,
		LogLevel:                 zerolog.InfoLevel,
		LogFormat:                "json",
	}
}

func TestLoadDefaults(t *testing.T) {
	t.Parallel()
	want := defaultConfig(t)

	got, err := Load(environ())
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("defaults:\n got %+v\nwant %+v", got, want)
	}
	if w := got.Warnings(); len(w) != 0 {
		t.Errorf("defaults warn: %q", w)
	}
	if err := want.Validate(); err != nil {
		t.Errorf("Validate(defaults) = %v", err)
	}

	// Set but empty takes the default too, except for the admin address.
	all := environ()
	for _, f := range configFields {
		if f.key != "SLUICE_UPSTREAM_URL" {
			all[f.key] = ""
		}
	}
	got, err = Load(all)
	if err != nil {
		t.Fatal(err)
	}
	want.AdminAddr = ""
	if !reflect.DeepEqual(got, want) {
		t.Errorf("all empty:\n got %+v\nwant %+v", got, want)
	}
}

func TestLoadValues(t *testing.T) {
	t.Parallel()
	tests := []struct {
		key, value string
		check      func(Config) any // returns the field to compare with want
		want       any
	}{
		{"SLUICE_QUEUE_MAX_BYTES", "65536", func(c Config) any { return c.QueueMaxBytes }, 64 * KiB},
		{"SLUICE_QUEUE_MAX_BYTES", "64KiB", func(c Config) any { return c.QueueMaxBytes }, 64 * KiB},
		{"SLUICE_QUEUE_MAX_BYTES", "64kib", func(c Config) any { return c.QueueMaxBytes }, 64 * KiB},
		{"SLUICE_QUEUE_MAX_BYTES", "64KIB", func(c Config) any { return c.QueueMaxBytes }, 64 * KiB},
		{"SLUICE_QUEUE_MAX_BYTES", "10MiB", func(c Config) any { return c.QueueMaxBytes }, 10 * MiB},
		{"SLUICE_QUEUE_MAX_BYTES", "1GiB", func(c Config) any { return c.QueueMaxBytes }, GiB},
		{"SLUICE_QUEUE_MAX_BYTES", "2048B", func(c Config) any { return c.QueueMaxBytes }, 2 * KiB},
		{"SLUICE_QUEUE_MAX_BYTES", "64KB", func(c Config) any { return c.QueueMaxBytes }, ByteSize(64000)},
		{"SLUICE_QUEUE_MAX_BYTES", "64kb", func(c Config) any { return c.QueueMaxBytes }, ByteSize(64000)},
		{"SLUICE_QUEUE_MAX_BYTES", "1MB", func(c Config) any { return c.QueueMaxBytes }, ByteSize(1_000_000)},
		{"SLUICE_QUEUE_MAX_BYTES", "2GB", func(c Config) any { return c.QueueMaxBytes }, ByteSize(2_000_000_000)},
		{"SLUICE_UPSTREAM_READ_BUFFER", "0", func(c Config) any { return c.UpstreamReadBuffer }, ByteSize(0)},
		{"SLUICE_UPSTREAM_READ_BUFFER", "4KiB", func(c Config) any { return c.UpstreamReadBuffer }, 4 * KiB},
		{"SLUICE_UPSTREAM_READ_BUFFER", "64MiB", func(c Config) any { return c.UpstreamReadBuffer }, 64 * MiB},
		{"SLUICE_UPSTREAM_WRITE_BUFFER", "0", func(c Config) any { return c.UpstreamWriteBuffer }, ByteSize(0)},
		{"SLUICE_UPSTREAM_WRITE_BUFFER", "64KiB", func(c Config) any { return c.UpstreamWriteBuffer }, 64 * KiB},
		{"SLUICE_CLIENT_READ_BUFFER", "0", func(c Config) any { return c.ClientReadBuffer }, ByteSize(0)},
		{"SLUICE_CLIENT_READ_BUFFER", "4KiB", func(c Config) any { return c.ClientReadBuffer }, 4 * KiB},
		{"SLUICE_UPSTREAM_WRITE_TIMEOUT", "500ms", func(c Config) any { return c.UpstreamWriteTimeout }, 500 * time.Millisecond},
		{"SLUICE_UPSTREAM_FRAME_READ_TIMEOUT", "0", func(c Config) any { return c.UpstreamFrameReadTimeout }, time.Duration(0)},
		{"SLUICE_MAX_HEADER_BYTES", "1KiB", func(c Config) any { return c.MaxHeaderBytes }, KiB},
		{"SLUICE_MAX_HEADER_BYTES", "1MiB", func(c Config) any { return c.MaxHeaderBytes }, MiB},
		{"SLUICE_MAX_FRAME_BYTES", "125", func(c Config) any { return c.MaxFrameBytes }, ByteSize(125)},
		{"SLUICE_MAX_MESSAGE_BYTES", "125", func(c Config) any { return c.MaxMessageBytes }, ByteSize(125)},
		{"SLUICE_UPSTREAM_URL", "http://b:80/x?y=1", func(c Config) any { return c.UpstreamURL.String() }, "ws://b:80/x?y=1"},
		{"SLUICE_UPSTREAM_URL", "HTTPS://b/x", func(c Config) any { return c.UpstreamURL.String() }, "wss://b/x"},
		{"SLUICE_UPSTREAM_URL", "wss://[::1]:9000", func(c Config) any { return c.UpstreamURL.String() }, "wss://[::1]:9000"},
		{"SLUICE_LISTEN_ADDR", "127.0.0.1:0", func(c Config) any { return c.ListenAddr }, "127.0.0.1:0"},
		{"SLUICE_LISTEN_ADDR", "[::1]:8443", func(c Config) any { return c.ListenAddr }, "[::1]:8443"},
		{"SLUICE_ADMIN_ADDR", "<unset>", func(c Config) any { return c.AdminAddr }, ":9090"},
		{"SLUICE_ADMIN_ADDR", "", func(c Config) any { return c.AdminAddr }, ""},
		{"SLUICE_ADMIN_ADDR", "localhost:9999", func(c Config) any { return c.AdminAddr }, "localhost:9999"},
		{"SLUICE_PPROF", "true", func(c Config) any { return c.Pprof }, true},
		{"SLUICE_POLICY", "DROP", func(c Config) any { return c.Policy }, PolicyDrop},
		{"SLUICE_POLICY", "pause", func(c Config) any { return c.Policy }, PolicyPause},
		{"SLUICE_UPSTREAM_CLOSE_CODE", "1011", func(c Config) any { return c.UpstreamCloseCode }, 1011},
		{"SLUICE_UPSTREAM_CLOSE_CODE", "1012", func(c Config) any { return c.UpstreamCloseCode }, 1012},
		{"SLUICE_QUEUE_MAX_MESSAGES", "1000000", func(c Config) any { return c.QueueMaxMessages }, 1_000_000},
		{"SLUICE_QUEUE_LOW_WATER", "0.75", func(c Config) any { return c.QueueLowWater }, 0.75},
		{"SLUICE_SLOW_CLIENT_MAX_RATIO", "1", func(c Config) any { return c.SlowClientMaxRatio }, 1.0},
		{"SLUICE_GLOBAL_QUEUE_MAX_BYTES", "2.5%", func(c Config) any { return c.GlobalQueueMaxBytes }, GlobalQueueLimit{Percent: 2.5}},
		{"SLUICE_GLOBAL_QUEUE_MAX_BYTES", "512MiB", func(c Config) any { return c.GlobalQueueMaxBytes }, GlobalQueueLimit{Bytes: 512 * MiB}},
		{"SLUICE_PING_INTERVAL", "0", func(c Config) any { return c.PingInterval }, time.Duration(0)},
		{"SLUICE_PAUSE_MAX", "1m30s", func(c Config) any { return c.PauseMax }, 90 * time.Second},
		{"SLUICE_DRAIN_DELAY", "29s", func(c Config) any { return c.DrainDelay }, 29 * time.Second},
		{"SLUICE_LOG_LEVEL", "debug", func(c Config) any { return c.LogLevel }, zerolog.DebugLevel},
		{"SLUICE_LOG_LEVEL", "WARN", func(c Config) any { return c.LogLevel }, zerolog.WarnLevel},
		{"SLUICE_LOG_LEVEL", "disabled", func(c Config) any { return c.LogLevel }, zerolog.Disabled},
		{"SLUICE_LOG_FORMAT", "Console", func(c Config) any { return c.LogFormat }, "console"},
		{"SLUICE_FRAME_READ_TIMEOUT", "0", func(c Config) any { return c.FrameReadTimeout }, time.Duration(0)},
		{"SLUICE_FRAME_READ_TIMEOUT", "1m", func(c Config) any { return c.FrameReadTimeout }, time.Minute},
		{"SLUICE_MAX_CONNECTIONS", "0", func(c Config) any { return c.MaxConnections }, 0},
		{"SLUICE_MAX_CONNECTIONS", "10000000", func(c Config) any { return c.MaxConnections }, 10_000_000},
		{"SLUICE_MAX_CONNECTIONS_PER_IP", "100", func(c Config) any { return c.MaxConnectionsPerIP }, 100},
		{"SLUICE_MAX_HANDSHAKES_PER_SECOND", "1000000", func(c Config) any { return c.MaxHandshakesPerSecond }, 1_000_000},
		{"SLUICE_UPSTREAM_MAX_HANDSHAKES", "0", func(c Config) any { return c.UpstreamMaxHandshakes }, 0},
		{"SLUICE_UPSTREAM_HANDSHAKES_PER_SECOND", "500", func(c Config) any { return c.UpstreamHandshakesPerSecond }, 500},
		{"SLUICE_QUEUE_TIMEOUT", "250ms", func(c Config) any { return c.QueueTimeout }, 250 * time.Millisecond},
		{"SLUICE_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.7 ,fd00::/8,", func(c Config) any {
			return fmt.Sprint(mustProxyOptions(c).TrustedProxies)
		}, "[10.0.0.0/8 192.168.1.7/32 fd00::/8]"},
		{"SLUICE_TRUSTED_PROXIES", "::ffff:10.0.0.0/104", func(c Config) any {
			return fmt.Sprint(mustProxyOptions(c).TrustedProxies)
		}, "[10.0.0.0/8]"},
		{"SLUICE_ALLOWED_ORIGINS", "https://app.example.com, https://*.example.com,http://localhost:3000", func(c Config) any {
			return fmt.Sprint(mustProxyOptions(c).AllowedOrigins)
		}, "[https://app.example.com https://*.example.com http://localhost:3000]"},
	}
	for _, tt := range tests {
		t.Run(tt.key+"="+tt.value, func(t *testing.T) {
			t.Parallel()
			cfg, err := Load(environ(tt.key, tt.value))
			if err != nil {
				t.Fatal(err)
			}
			if got := tt.check(cfg); got != tt.want {
				t.Errorf("got %v (%T), want %v (%T)", got, got, tt.want, tt.want)
			}
		})
	}
}

// TestLoadInvalid sets one variable to a value breaking its own rule:
// the error must be the single line naming the variable, the value and
// the allowed form.
func TestLoadInvalid(t *testing.T) {
	t.Parallel()
	tests := []struct{ key, value string }{
		{"SLUICE_LISTEN_ADDR", "8080"},
		{"SLUICE_LISTEN_ADDR", "localhost"},
		{"SLUICE_LISTEN_ADDR", ":70000"},
		{"SLUICE_LISTEN_ADDR", ":http"},
		{"SLUICE_LISTEN_ADDR", "127.0.0.1:"},
		{"SLUICE_ADMIN_ADDR", "9090"},
		{"SLUICE_PPROF", "yes please"},
		{"SLUICE_HANDSHAKE_TIMEOUT", "0"},
		{"SLUICE_HANDSHAKE_TIMEOUT", "-1s"},
		{"SLUICE_HANDSHAKE_TIMEOUT", "10"},
		{"SLUICE_HANDSHAKE_TIMEOUT", "soon"},
		{"SLUICE_MAX_HEADER_BYTES", "512"},
		{"SLUICE_MAX_HEADER_BYTES", "2MiB"},
		{"SLUICE_MAX_HEADER_BYTES", "1.5KiB"},
		{"SLUICE_UPSTREAM_URL", "backend:8080"},
		{"SLUICE_UPSTREAM_URL", "backend"},
		{"SLUICE_UPSTREAM_URL", "ftp://backend/"},
		{"SLUICE_UPSTREAM_URL", "ws://"},
		{"SLUICE_UPSTREAM_URL", "ws://:8080/"},
		{"SLUICE_UPSTREAM_URL", "ws:///socket"},
		{"SLUICE_UPSTREAM_URL", "ws://backend/socket#top"},
		{"SLUICE_UPSTREAM_URL", "ws://[::1"},
		{"SLUICE_UPSTREAM_DIAL_TIMEOUT", "0s"},
		{"SLUICE_UPSTREAM_READ_BUFFER", "1KiB"},
		{"SLUICE_UPSTREAM_READ_BUFFER", "128MiB"},
		{"SLUICE_UPSTREAM_READ_BUFFER", "-1"},
		{"SLUICE_UPSTREAM_WRITE_BUFFER", "32KiB"},
		{"SLUICE_UPSTREAM_WRITE_BUFFER", "128MiB"},
		{"SLUICE_CLIENT_READ_BUFFER", "1KiB"},
		{"SLUICE_UPSTREAM_WRITE_TIMEOUT", "0"},
		{"SLUICE_UPSTREAM_FRAME_READ_TIMEOUT", "-1s"},
		{"SLUICE_UPSTREAM_CLOSE_CODE", "1000"},
		{"SLUICE_UPSTREAM_CLOSE_CODE", "1013"},
		{"SLUICE_UPSTREAM_CLOSE_CODE", "abc"},
		{"SLUICE_UPSTREAM_CLOSE_CODE", "1014.0"},
		{"SLUICE_MAX_FRAME_BYTES", "124"},
		{"SLUICE_MAX_FRAME_BYTES", "0"},
		{"SLUICE_MAX_MESSAGE_BYTES", "100B"},
		{"SLUICE_WRITE_TIMEOUT", "0"},
		{"SLUICE_POLICY", "block"},
		{"SLUICE_POLICY", "evict,drop"},
		{"SLUICE_QUEUE_MAX_MESSAGES", "0"},
		{"SLUICE_QUEUE_MAX_MESSAGES", "1000001"},
		{"SLUICE_QUEUE_MAX_MESSAGES", "-5"},
		{"SLUICE_QUEUE_MAX_MESSAGES", "1e3"},
		{"SLUICE_QUEUE_MAX_MESSAGES", "99999999999"},
		{"SLUICE_QUEUE_MAX_BYTES", "10 potatoes"},
		{"SLUICE_QUEUE_MAX_BYTES", "1023"},
		{"SLUICE_QUEUE_MAX_BYTES", "1000B"},
		{"SLUICE_QUEUE_MAX_BYTES", "99999999999GiB"},
		{"SLUICE_QUEUE_LOW_WATER", "0"},
		{"SLUICE_QUEUE_LOW_WATER", "1"},
		{"SLUICE_QUEUE_LOW_WATER", "1.5"},
		{"SLUICE_QUEUE_LOW_WATER", "-0.1"},
		{"SLUICE_QUEUE_LOW_WATER", "NaN"},
		{"SLUICE_QUEUE_LOW_WATER", "half"},
		{"SLUICE_DROP_KEEP_NEWEST", "0"},
		{"SLUICE_PAUSE_MAX", "-1s"},
		{"SLUICE_GLOBAL_QUEUE_MAX_BYTES", "0%"},
		{"SLUICE_GLOBAL_QUEUE_MAX_BYTES", "101%"},
		{"SLUICE_GLOBAL_QUEUE_MAX_BYTES", "0"},
		{"SLUICE_GLOBAL_QUEUE_MAX_BYTES", "-5%"},
		{"SLUICE_GLOBAL_QUEUE_MAX_BYTES", "5 %"},
		{"SLUICE_GLOBAL_QUEUE_MAX_BYTES", "NaN%"},
		{"SLUICE_GLOBAL_QUEUE_MAX_BYTES", "lots"},
		{"SLUICE_SLOW_CLIENT_AGE", "0"},
		{"SLUICE_SLOW_CLIENT_AGE", "50ms"},
		{"SLUICE_SLOW_CLIENT_AGE", "11m"},
		{"SLUICE_SLOW_CLIENT_MAX_RATIO", "0"},
		{"SLUICE_SLOW_CLIENT_MAX_RATIO", "1.01"},
		{"SLUICE_SLOW_CLIENT_MAX_RATIO", "Inf"},
		{"SLUICE_PING_INTERVAL", "-1s"},
		{"SLUICE_PONG_TIMEOUT", "0"},
		{"SLUICE_UPSTREAM_PING_INTERVAL", "-5s"},
		{"SLUICE_CLOSE_TIMEOUT", "0"},
		{"SLUICE_SHUTDOWN_TIMEOUT", "0"},
		{"SLUICE_DRAIN_DELAY", "-1s"},
		{"SLUICE_DRAIN_SPREAD", "-1s"},
		{"SLUICE_LOG_LEVEL", "verbose"},
		{"SLUICE_LOG_LEVEL", "-2"},
		{"SLUICE_LOG_FORMAT", "text"},
		{"SLUICE_FRAME_READ_TIMEOUT", "-1s"},
		{"SLUICE_FRAME_READ_TIMEOUT", "30"},
		{"SLUICE_MAX_CONNECTIONS", "-1"},
		{"SLUICE_MAX_CONNECTIONS", "10000001"},
		{"SLUICE_MAX_CONNECTIONS", "lots"},
		{"SLUICE_MAX_CONNECTIONS_PER_IP", "-1"},
		{"SLUICE_MAX_CONNECTIONS_PER_IP", "1.5"},
		{"SLUICE_MAX_HANDSHAKES_PER_SECOND", "-5"},
		{"SLUICE_MAX_HANDSHAKES_PER_SECOND", "1000001"},
		{"SLUICE_MAX_HANDSHAKES_PER_SECOND", "0.5"},
		{"SLUICE_UPSTREAM_MAX_HANDSHAKES", "-1"},
		{"SLUICE_UPSTREAM_MAX_HANDSHAKES", "1000001"},
		{"SLUICE_UPSTREAM_HANDSHAKES_PER_SECOND", "-1"},
		{"SLUICE_UPSTREAM_HANDSHAKES_PER_SECOND", "1000001"},
		{"SLUICE_QUEUE_TIMEOUT", "0"},
		{"SLUICE_QUEUE_TIMEOUT", "11m"},
	}
	for _, tt := range tests {
		t.Run(tt.key+"="+tt.value, func(t *testing.T) {
			t.Parallel()
			cfg, err := Load(environ(tt.key, tt.value))
			lines := problemLines(t, err)
			if want := wantLine(t, tt.key, tt.value); len(lines) != 1 || lines[0] != want {
				t.Errorf("error:\n%s\nwant:\n%s", err, want)
			}
			if !reflect.DeepEqual(cfg, Config{}) {
				t.Errorf("config on error is %+v, want the zero Config", cfg)
			}
		})
	}
}

// TestLoadLists: a bad entry of a list variable is reported on one
// line naming the variable, the whole value, the allowed form and the
// entry at fault.
func TestLoadLists(t *testing.T) {
	t.Parallel()
	tests := []struct{ key, value, why string }{
		{"SLUICE_TRUSTED_PROXIES", "10.0.0.0/8,10.0.0.300", `"10.0.0.300" is not an IP address or a CIDR`},
		{"SLUICE_TRUSTED_PROXIES", "10.0.0.0/33", `"10.0.0.0/33" is not a CIDR such as 10.0.0.0/8 or fd00::/8`},
		{"SLUICE_TRUSTED_PROXIES", "fe80::1%eth0", `"fe80::1%eth0" is not an IP address or a CIDR`},
		{"SLUICE_TRUSTED_PROXIES", "proxy.internal", `"proxy.internal" is not an IP address or a CIDR`},
		{"SLUICE_TRUSTED_PROXIES", "10.0.0.0/8 fd00::/8", `"10.0.0.0/8 fd00::/8" is not a CIDR such as 10.0.0.0/8 or fd00::/8`},
		{"SLUICE_ALLOWED_ORIGINS", "https://app.example.com/", `"https://app.example.com/" has more than a host and port`},
		{"SLUICE_ALLOWED_ORIGINS", "app.example.com", `"app.example.com" has no scheme://`},
		{"SLUICE_ALLOWED_ORIGINS", "*.example.com", `"*.example.com" has no scheme://`},
		{"SLUICE_ALLOWED_ORIGINS", "https://ok.example.com,https://*", `"https://*" has a * that is not a leading *. label`},
		{"SLUICE_ALLOWED_ORIGINS", "https://a.*.example.com", `"https://a.*.example.com" has a * that is not a leading *. label`},
		{"SLUICE_ALLOWED_ORIGINS", "https://*example.com", `"https://*example.com" has a * that is not a leading *. label`},
		{"SLUICE_ALLOWED_ORIGINS", "https://example.com:0", `"https://example.com:0" has an invalid port`},
		{"SLUICE_ALLOWED_ORIGINS", "https://example.com:99999", `"https://example.com:99999" has an invalid port`},
		{"SLUICE_ALLOWED_ORIGINS", "https://user@example.com", `"https://user@example.com" has more than a host and port`},
		{"SLUICE_ALLOWED_ORIGINS", "null", `"null" has no scheme://`},
	}
	for _, tt := range tests {
		t.Run(tt.key+"="+tt.value, func(t *testing.T) {
			t.Parallel()
			_, err := Load(environ(tt.key, tt.value))
			lines := problemLines(t, err)
			want := fmt.Sprintf("%s=%q: want %s; %s", tt.key, tt.value, fieldsByName[map[string]string{
				"SLUICE_TRUSTED_PROXIES": "TrustedProxies", "SLUICE_ALLOWED_ORIGINS": "AllowedOrigins",
			}[tt.key]].want, tt.why)
			if len(lines) != 1 || !strings.HasPrefix(lines[0], want) {
				t.Errorf("error:\n%s\nwant a line starting:\n%s", err, want)
			}
		})
	}
	// Validate checks a Config built in code the same way.
	cfg := defaultConfig(t)
	cfg.AllowedOrigins = []string{"https://ok.example.com", "example.com"}
	if got := problemLines(t, cfg.Validate()); len(got) != 1 || !strings.HasPrefix(got[0], `SLUICE_ALLOWED_ORIGINS="[https://ok.example.com example.com]": want `) {
		t.Errorf("Validate: %q", got)
	}
}

// TestLoadBriefExample pins the message quoted in Load's doc.
func TestLoadBriefExample(t *testing.T) {
	t.Parallel()
	_, err := Load(environ("SLUICE_QUEUE_MAX_BYTES", "10 potatoes"))
	const want = `SLUICE_QUEUE_MAX_BYTES="10 potatoes": want a size of at least 1KiB, such as 65536, 64KiB or 10MiB`
	if err == nil || err.Error() != want {
		t.Errorf("got %v\nwant %s", err, want)
	}
}

func TestLoadCrossField(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		env  []string
		want []string // every line of the error, in order; nil for success
	}{
		{"pong after ping", []string{"SLUICE_PONG_TIMEOUT", "30s"}, []string{
			`SLUICE_PONG_TIMEOUT="30s": want a duration shorter than SLUICE_PING_INTERVAL (25s)`,
		}},
		{"pong equals ping", []string{"SLUICE_PING_INTERVAL", "10s"}, []string{
			`SLUICE_PONG_TIMEOUT="10s": want a duration shorter than SLUICE_PING_INTERVAL (10s)`,
		}},
		{"ping off frees pong", []string{"SLUICE_PING_INTERVAL", "0", "SLUICE_PONG_TIMEOUT", "1h"}, nil},
		{"pong after upstream ping", []string{"SLUICE_UPSTREAM_PING_INTERVAL", "5s"}, []string{
			`SLUICE_PONG_TIMEOUT="10s": want a duration shorter than SLUICE_UPSTREAM_PING_INTERVAL (5s)`,
		}},
		{"pong after both pings", []string{"SLUICE_PING_INTERVAL", "5s", "SLUICE_UPSTREAM_PING_INTERVAL", "4s"}, []string{
			`SLUICE_PONG_TIMEOUT="10s": want a duration shorter than SLUICE_PING_INTERVAL (5s)`,
			`SLUICE_PONG_TIMEOUT="10s": want a duration shorter than SLUICE_UPSTREAM_PING_INTERVAL (4s)`,
		}},
		{"keep newest above max messages", []string{"SLUICE_QUEUE_MAX_MESSAGES", "5"}, []string{
			`SLUICE_DROP_KEEP_NEWEST="10": want at most SLUICE_QUEUE_MAX_MESSAGES (5)`,
		}},
		{"retired slow depth", []string{"SLUICE_SLOW_CLIENT_DEPTH", "5"}, []string{
			`SLUICE_SLOW_CLIENT_DEPTH="5": no longer read: a client is slow when it stops taking bytes, not when its queue is deep; set SLUICE_SLOW_CLIENT_AGE (a duration such as 5s) instead`,
		}},
		{"keep newest equals max messages", []string{"SLUICE_QUEUE_MAX_MESSAGES", "10"}, nil},
		{"drain longer than shutdown", []string{"SLUICE_DRAIN_DELAY", "20s", "SLUICE_DRAIN_SPREAD", "15s"}, []string{
			`SLUICE_DRAIN_DELAY+SLUICE_DRAIN_SPREAD="20s+15s": want a total shorter than SLUICE_SHUTDOWN_TIMEOUT (30s)`,
		}},
		{"drain equals shutdown", []string{"SLUICE_DRAIN_SPREAD", "5s", "SLUICE_SHUTDOWN_TIMEOUT", "10s"}, []string{
			`SLUICE_DRAIN_DELAY+SLUICE_DRAIN_SPREAD="5s+5s": want a total shorter than SLUICE_SHUTDOWN_TIMEOUT (10s)`,
		}},
		{"drain sum overflows", []string{"SLUICE_DRAIN_DELAY", "2562047h", "SLUICE_DRAIN_SPREAD", "2562047h"}, []string{
			`SLUICE_DRAIN_DELAY+SLUICE_DRAIN_SPREAD="2562047h+2562047h": want a total shorter than SLUICE_SHUTDOWN_TIMEOUT (30s)`,
		}},
		{"drain just fits", []string{"SLUICE_DRAIN_DELAY", "20s", "SLUICE_DRAIN_SPREAD", "9999ms"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := Load(environ(tt.env...))
			if tt.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if got := problemLines(t, err); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("error:\n%s\nwant:\n%s", err, strings.Join(tt.want, "\n"))
			}
		})
	}
}

// TestLoadReportsEveryProblem: parse errors, range errors, a
// cross-field conflict and an unknown variable, all in one error, in field
// order, unknown variables last.
func TestLoadReportsEveryProblem(t *testing.T) {
	t.Parallel()
	_, err := Load(map[string]string{
		"SLUICE_UPSTREAM_URL":       "tcp://backend",
		"SLUICE_LISTEN_ADDR":        "8080",
		"SLUICE_QUEUE_MAX_BYTES":    "10 potatoes",
		"SLUICE_QUEUE_MAX_MESSAGES": "5",
		"SLUICE_POLICY":             "yolo",
		"SLUICE_PONG_TIMEOUT":       "1m",
		"SLUICE_LOG_LEVEL":          "loud",
		"SLUICE_POLCY":              "drop",
		"HOME":                      "/root", // not ours: ignored
	})
	want := []string{
		wantLine(t, "SLUICE_LISTEN_ADDR", "8080"),
		wantLine(t, "SLUICE_UPSTREAM_URL", "tcp://backend"),
		wantLine(t, "SLUICE_POLICY", "yolo"),
		wantLine(t, "SLUICE_QUEUE_MAX_BYTES", "10 potatoes"),
		`SLUICE_DROP_KEEP_NEWEST="10": want at most SLUICE_QUEUE_MAX_MESSAGES (5)`,
		`SLUICE_PONG_TIMEOUT="1m": want a duration shorter than SLUICE_PING_INTERVAL (25s)`,
		wantLine(t, "SLUICE_LOG_LEVEL", "loud"),
		`SLUICE_POLCY="drop": unknown variable; did you mean SLUICE_POLICY?`,
	}
	if got := problemLines(t, err); !reflect.DeepEqual(got, want) {
		t.Errorf("error:\n%s\nwant:\n%s", err, strings.Join(want, "\n"))
	}
}

// TestLoadSkipsChecksOfUnparsedFields: a field that does not parse is
// reported once, not again by the rules that involve it.
func TestLoadSkipsChecksOfUnparsedFields(t *testing.T) {
	t.Parallel()
	tests := [][]string{
		{"SLUICE_PING_INTERVAL", "often", "SLUICE_PONG_TIMEOUT", "1h"},
		{"SLUICE_PONG_TIMEOUT", "later"},
		{"SLUICE_QUEUE_MAX_MESSAGES", "many", "SLUICE_DROP_KEEP_NEWEST", "500"},
		{"SLUICE_QUEUE_MAX_MESSAGES", "0", "SLUICE_DROP_KEEP_NEWEST", "500"},
		{"SLUICE_SHUTDOWN_TIMEOUT", "0", "SLUICE_DRAIN_DELAY", "1m"},
		{"SLUICE_DRAIN_DELAY", "-1h", "SLUICE_DRAIN_SPREAD", "1h"},
	}
	for _, kv := range tests {
		_, err := Load(environ(kv...))
		if lines := problemLines(t, err); len(lines) != 1 || !strings.HasPrefix(lines[0], kv[0]+"=") {
			t.Errorf("%q: want one problem, with %s:\n%s", kv, kv[0], err)
		}
	}
}

func TestLoadUpstream(t *testing.T) {
	t.Parallel()

	_, err := Load(map[string]string{})
	want := `SLUICE_UPSTREAM_URL="": required; want ` + fieldsByName["UpstreamURL"].want
	if got := problemLines(t, err); len(got) != 1 || got[0] != want {
		t.Errorf("no upstream:\n%s\nwant:\n%s", err, want)
	}
	_, err = Load(nil)
	if got := problemLines(t, err); len(got) != 1 || got[0] != want {
		t.Errorf("nil environment:\n%s\nwant:\n%s", err, want)
	}
	_, err = Load(map[string]string{"SLUICE_UPSTREAM_URL": ""})
	if got := problemLines(t, err); len(got) != 1 || got[0] != want {
		t.Errorf("empty upstream:\n%s\nwant:\n%s", err, want)
	}

	cfg, err := Load(map[string]string{}, AllowNoUpstream())
	if err != nil {
		t.Fatal(err)
	}
	if cfg.UpstreamURL != nil {
		t.Errorf("AllowNoUpstream: UpstreamURL = %v, want nil", cfg.UpstreamURL)
	}
	if err := cfg.Validate(); err != nil {
		t.Errorf("Validate with no upstream: %v", err)
	}

	// A URL that is set is still checked.
	_, err = Load(map[string]string{"SLUICE_UPSTREAM_URL": "backend:80"}, AllowNoUpstream())
	if got := problemLines(t, err); len(got) != 1 || got[0] != wantLine(t, "SLUICE_UPSTREAM_URL", "backend:80") {
		t.Errorf("AllowNoUpstream with a bad URL:\n%s", err)
	}

	// Passwords never appear in messages.
	for _, u := range []string{"ftp://user:hunter2@backend/", "ws://user:hunter2@[::1/", "ws://user:hunter2@backend/#x"} {
		_, err = Load(map[string]string{"SLUICE_UPSTREAM_URL": u, "SLUICE_UPSTREM_URL": u})
		if got := problemLines(t, err); len(got) != 2 || strings.Contains(err.Error(), "hunter2") ||
			!strings.Contains(err.Error(), "user:xxxxx@") {
			t.Errorf("%s: error leaks or loses the user info:\n%s", u, err)
		}
	}
}

func TestLoadUnknownVariables(t *testing.T) {
	t.Parallel()
	tests := []struct{ name, suggestion string }{
		{"SLUICE_POLCY", "SLUICE_POLICY"},
		{"sluice_policy", "SLUICE_POLICY"},
		{"Sluice_Log_Level", "SLUICE_LOG_LEVEL"},
		{"SLUICE_MAX_QUEUE_BYTES", "SLUICE_QUEUE_MAX_BYTES"},
		{"SLUICE_QUEUE_MAX_MESSAGE", "SLUICE_QUEUE_MAX_MESSAGES"},
		{"SLUICE_LISTEN_ADDRESS", "SLUICE_LISTEN_ADDR"},
		{"SLUICE_UPSTREAM", "SLUICE_UPSTREAM_URL"},
		{"SLUICE_PING", "SLUICE_PING_INTERVAL"},
		{"SLUICE_PONG_TIMEOUT_MS", "SLUICE_PONG_TIMEOUT"},
		{"SLUICE_XYZZY", ""},
		{"SLUICE_", ""},
	}
	for _, tt := range tests {
		_, err := Load(environ(tt.name, "1"))
		want := fmt.Sprintf("%s=%q: unknown variable; did you mean %s?", tt.name, "1", tt.suggestion)
		if tt.suggestion == "" {
			want = fmt.Sprintf("%s=%q: unknown variable; config.example.env lists the known ones", tt.name, "1")
		}
		if got := problemLines(t, err); len(got) != 1 || got[0] != want {
			t.Errorf("%s:\n%s\nwant:\n%s", tt.name, err, want)
		}
	}
	// Variables that merely look alike are not ours.
	if _, err := Load(environ("SLUICEPOLICY", "x", "MY_SLUICE_POLICY", "x", "SLUIC_POLICY", "x")); err != nil {
		t.Errorf("foreign variables rejected: %v", err)
	}
}

func TestValidate(t *testing.T) {
	t.Parallel()
	base := defaultConfig(t)
	if err := base.Validate(); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		modify func(*Config)
		want   []string
	}{
		{"http scheme is Load's job", func(c *Config) { c.UpstreamURL = mustURL(t, "http://b/") }, []string{
			wantLine(t, "SLUICE_UPSTREAM_URL", "http://b/"),
		}},
		{"pong after ping", func(c *Config) { c.PongTimeout = time.Minute }, []string{
			`SLUICE_PONG_TIMEOUT="1m0s": want a duration shorter than SLUICE_PING_INTERVAL (25s)`,
		}},
		{"low water", func(c *Config) { c.QueueLowWater = math.NaN() }, []string{
			wantLine(t, "SLUICE_QUEUE_LOW_WATER", "NaN"),
		}},
		{"global limit with both", func(c *Config) { c.GlobalQueueMaxBytes = GlobalQueueLimit{Bytes: 1, Percent: 1} }, []string{
			wantLine(t, "SLUICE_GLOBAL_QUEUE_MAX_BYTES", "1%"),
		}},
		{"policy", func(c *Config) { c.Policy = "Evict" }, []string{
			wantLine(t, "SLUICE_POLICY", "Evict"),
		}},
		{"log level", func(c *Config) { c.LogLevel = zerolog.NoLevel }, []string{
			wantLine(t, "SLUICE_LOG_LEVEL", ""),
		}},
	}
	for _, tt := range tests {
		cfg := base
		tt.modify(&cfg)
		if got := problemLines(t, cfg.Validate()); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s:\n%s\nwant:\n%s", tt.name, strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
		}
	}

	// The zero Config is wrong in many ways, and says so without panicking.
	if got := problemLines(t, Config{}.Validate()); len(got) < 20 {
		t.Errorf("zero Config: only %d problems:\n%s", len(got), strings.Join(got, "\n"))
	}
}

func TestWarnings(t *testing.T) {
	t.Parallel()
	tests := []struct {
		env  []string
		want []string // substrings, one per warning
	}{
		{nil, nil},
		{[]string{"SLUICE_PING_INTERVAL", "0"}, []string{"SLUICE_PING_INTERVAL=0"}},
		{[]string{"SLUICE_POLICY", "pause"}, nil},
		{[]string{"SLUICE_POLICY", "pause", "SLUICE_PAUSE_MAX", "0"}, []string{"SLUICE_PAUSE_MAX=0"}},
		{[]string{"SLUICE_POLICY", "pause", "SLUICE_PAUSE_MAX", "5s"}, nil},
		{[]string{"SLUICE_POLICY", "drop", "SLUICE_PING_INTERVAL", "0"}, []string{"keepalive off"}},
		{[]string{"SLUICE_PROXY_PROTOCOL", "true"}, []string{"SLUICE_TRUSTED_PROXIES"}},
		{[]string{"SLUICE_PROXY_PROTOCOL", "true", "SLUICE_TRUSTED_PROXIES", "10.0.0.0/8"}, nil},
	}
	for _, tt := range tests {
		cfg, err := Load(environ(tt.env...))
		if err != nil {
			t.Fatal(err)
		}
		got := cfg.Warnings()
		if len(got) != len(tt.want) {
			t.Errorf("%q: warnings %q, want %d", tt.env, got, len(tt.want))
			continue
		}
		for i := range got {
			if !strings.Contains(got[i], tt.want[i]) {
				t.Errorf("%q: warning %q does not mention %q", tt.env, got[i], tt.want[i])
			}
		}
	}
}

// byteSizeTests are shared by the parse test and the fuzz seeds.
var byteSizeTests = []struct {
	in   string
	want ByteSize
	ok   bool
}{
	{"0", 0, true},
	{"1", 1, true},
	{"65536", 64 * KiB, true},
	{"007", 7, true},
	{"512B", 512, true},
	{"512b", 512, true},
	{"64KiB", 64 * KiB, true},
	{"64kib", 64 * KiB, true},
	{"64KIB", 64 * KiB, true},
	{"10MiB", 10 * MiB, true},
	{"10mib", 10 * MiB, true},
	{"1GiB", GiB, true},
	{"0KiB", 0, true},
	{"64KB", 64_000, true},
	{"64kb", 64_000, true},
	{"1MB", 1_000_000, true},
	{"1gb", 1_000_000_000, true},
	{"9223372036854775807", math.MaxInt64, true},
	{"9223372036854775807B", math.MaxInt64, true},
	{"8589934591GiB", (1<<33 - 1) << 30, true},

	{"", 0, false},
	{" ", 0, false},
	{"\t\n", 0, false},
	{"-1", 0, false},
	{"-1KiB", 0, false},
	{"+5", 0, false},
	{"1.5MiB", 0, false},
	{"1,5MiB", 0, false},
	{"1.0", 0, false},
	{"10 potatoes", 0, false},
	{" 64KiB", 0, false},
	{"64KiB ", 0, false},
	{"64 KiB", 0, false},
	{"KiB", 0, false},
	{"1K", 0, false},
	{"1k", 0, false},
	{"1M", 0, false},
	{"1KiBB", 0, false},
	{"1TiB", 0, false},
	{"1iB", 0, false},
	{"1Kib ", 0, false},
	{"9223372036854775808", 0, false},
	{"8589934592GiB", 0, false},
	{"9223372036854775807KB", 0, false},
	{"99999999999999999999999", 0, false},
	{"0x10", 0, false},
	{"1_000", 0, false},
	{"1e6", 0, false},
	{"६४", 0, false},
	{"64\u212AiB", 0, false}, // Kelvin sign folds to k in Unicode
	{"64KiB\x00", 0, false},
}

func TestParseByteSize(t *testing.T) {
	t.Parallel()
	for _, tt := range byteSizeTests {
		got, err := ParseByteSize(tt.in)
		if tt.ok != (err == nil) || got != tt.want {
			t.Errorf("ParseByteSize(%q) = %d, %v; want %d, ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
		if err != nil && !strings.HasPrefix(err.Error(), "config: ") {
			t.Errorf("ParseByteSize(%q) error %q lacks the package prefix", tt.in, err)
		}
	}
}

func TestByteSizeString(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in   ByteSize
		want string
	}{
		{0, "0"},
		{1, "1"},
		{1023, "1023"},
		{1024, "1KiB"},
		{1536, "1536"},
		{64_000, "64000"},
		{32 * KiB, "32KiB"},
		{10485760, "10MiB"},
		{1025 * KiB, "1025KiB"},
		{GiB, "1GiB"},
		{3 * GiB, "3GiB"},
		{1 << 40, "1024GiB"},
		{math.MaxInt64, "9223372036854775807"},
	}
	for _, tt := range tests {
		if got := tt.in.String(); got != tt.want {
			t.Errorf("ByteSize(%d).String() = %q, want %q", int64(tt.in), got, tt.want)
		}
		back, err := ParseByteSize(tt.in.String())
		if err != nil || back != tt.in {
			t.Errorf("round trip of %d: %d, %v", int64(tt.in), back, err)
		}
		if text, _ := tt.in.MarshalText(); string(text) != tt.want {
			t.Errorf("ByteSize(%d).MarshalText() = %q", int64(tt.in), text)
		}
	}
}

// FuzzParseByteSize: never panics, accepts only non-negative sizes, and
// String of anything accepted parses back to the same value. Seeds live in
// testdata/fuzz/FuzzParseByteSize.
func FuzzParseByteSize(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		b, err := ParseByteSize(s)
		if err != nil {
			if b != 0 {
				t.Fatalf("ParseByteSize(%q) = %d with error %v", s, b, err)
			}
			return
		}
		if b < 0 {
			t.Fatalf("ParseByteSize(%q) = %d < 0", s, b)
		}
		back, err := ParseByteSize(b.String())
		if err != nil || back != b {
			t.Fatalf("ParseByteSize(%q) = %d; String %q parses to %d, %v", s, b, b.String(), back, err)
		}
	})
}

func TestGlobalQueueLimit(t *testing.T) {
	t.Parallel()
	parse := []struct {
		in   string
		want GlobalQueueLimit
		ok   bool
	}{
		{"5%", GlobalQueueLimit{Percent: 5}, true},
		{"2.5%", GlobalQueueLimit{Percent: 2.5}, true},
		{"0.01%", GlobalQueueLimit{Percent: 0.01}, true},
		{"100%", GlobalQueueLimit{Percent: 100}, true},
		{"100.000%", GlobalQueueLimit{Percent: 100}, true},
		{"512MiB", GlobalQueueLimit{Bytes: 512 * MiB}, true},
		{"1", GlobalQueueLimit{Bytes: 1}, true},
		{"2GB", GlobalQueueLimit{Bytes: 2_000_000_000}, true},

		{"", GlobalQueueLimit{}, false},
		{"0", GlobalQueueLimit{}, false},
		{"0%", GlobalQueueLimit{}, false},
		{"0.0%", GlobalQueueLimit{}, false},
		{"100.5%", GlobalQueueLimit{}, false},
		{"101%", GlobalQueueLimit{}, false},
		{"-5%", GlobalQueueLimit{}, false},
		{"5 %", GlobalQueueLimit{}, false},
		{" 5%", GlobalQueueLimit{}, false},
		{"%", GlobalQueueLimit{}, false},
		{".5%", GlobalQueueLimit{}, false},
		{"5.%", GlobalQueueLimit{}, false},
		{"1e1%", GlobalQueueLimit{}, false},
		{"NaN%", GlobalQueueLimit{}, false},
		{"Inf%", GlobalQueueLimit{}, false},
		{"0x1p2%", GlobalQueueLimit{}, false},
		{"5%%", GlobalQueueLimit{}, false},
		{"5MiB%", GlobalQueueLimit{}, false},
		{"lots", GlobalQueueLimit{}, false},
	}
	for _, tt := range parse {
		got, err := ParseGlobalQueueLimit(tt.in)
		if tt.ok != (err == nil) || got != tt.want {
			t.Errorf("ParseGlobalQueueLimit(%q) = %+v, %v; want %+v, ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
		if err != nil {
			continue
		}
		back, err := ParseGlobalQueueLimit(got.String())
		if err != nil || back != got {
			t.Errorf("round trip of %q via %q: %+v, %v", tt.in, got.String(), back, err)
		}
	}

	resolve := []struct {
		limit    GlobalQueueLimit
		memLimit int64
		want     int64
	}{
		{GlobalQueueLimit{Percent: 5}, 1000, 50},
		{GlobalQueueLimit{Percent: 2.5}, 8 << 30, 214748364},
		{GlobalQueueLimit{Percent: 100}, 4096, 4096},
		{GlobalQueueLimit{Percent: 5}, 0, 0},  // unknown memory: no ceiling
		{GlobalQueueLimit{Percent: 5}, -1, 0}, // likewise
		{GlobalQueueLimit{Percent: 0.0001}, 100, 1},
		{GlobalQueueLimit{Percent: 100}, math.MaxInt64, math.MaxInt64},
		{GlobalQueueLimit{Bytes: 512 * MiB}, 0, 512 << 20},
		{GlobalQueueLimit{Bytes: 512 * MiB}, 1 << 30, 512 << 20},
	}
	for _, tt := range resolve {
		if got := tt.limit.Resolve(tt.memLimit); got != tt.want {
			t.Errorf("%v.Resolve(%d) = %d, want %d", tt.limit, tt.memLimit, got, tt.want)
		}
	}
}

func TestMemoryLimit(t *testing.T) {
	// Not parallel: it changes the process memory limit.
	old := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(old) })

	debug.SetMemoryLimit(3 << 30)
	if got := MemoryLimit(); got != 3<<30 {
		t.Errorf("with a Go memory limit of 3GiB, MemoryLimit() = %d", got)
	}
	debug.SetMemoryLimit(math.MaxInt64)
	got := MemoryLimit()
	if got < 0 || got == math.MaxInt64 {
		t.Errorf("with no Go memory limit, MemoryLimit() = %d", got)
	}
	t.Logf("cgroup or system memory limit: %s", ByteSize(got))
}

// readExampleEnv parses config.example.env: KEY=value lines, comments and
// blank lines, nothing else.
func readExampleEnv(t *testing.T) map[string]string {
	t.Helper()
	f, err := os.Open("../config.example.env")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m := map[string]string{}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok || strings.ContainsAny(line, " \t'\"$`\\") {
			t.Fatalf("config.example.env:%d: %q is not a plain KEY=value line", n, line)
		}
		if _, dup := m[key]; dup {
			t.Fatalf("config.example.env:%d: %s set twice", n, key)
		}
		m[key] = value
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestExampleEnv keeps config.example.env in step with Config: it lists
// every variable with its default, and Load accepts it once an
// upstream is filled in.
func TestExampleEnv(t *testing.T) {
	t.Parallel()
	example := readExampleEnv(t)

	params, err := env.GetFieldParamsWithOptions(&Config{}, env.Options{Prefix: Prefix})
	if err != nil {
		t.Fatal(err)
	}
	if len(params) != reflect.TypeFor[Config]().NumField() {
		t.Errorf("GetFieldParams found %d variables for %d fields", len(params), reflect.TypeFor[Config]().NumField())
	}
	for _, p := range params {
		value, ok := example[p.Key]
		switch {
		case !ok:
			t.Errorf("config.example.env does not mention %s", p.Key)
		case value != p.DefaultValue:
			t.Errorf("config.example.env: %s=%s, but the default is %q", p.Key, value, p.DefaultValue)
		}
	}
	if len(example) != len(params) {
		t.Errorf("config.example.env sets %d variables, Config has %d", len(example), len(params))
	}

	example["SLUICE_UPSTREAM_URL"] = testUpstream
	cfg, err := Load(example)
	if err != nil {
		t.Fatalf("Load(config.example.env):\n%s", err)
	}
	if want := defaultConfig(t); !reflect.DeepEqual(cfg, want) {
		t.Errorf("config.example.env does not give the defaults:\n got %+v\nwant %+v", cfg, want)
	}
}

// TestExampleEnvSources checks that a POSIX shell reads config.example.env
// the way readExampleEnv does.
func TestExampleEnvSources(t *testing.T) {
	t.Parallel()
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh:", err)
	}
	cmd := exec.Command(sh, "-c", `set -a; . ./config.example.env; set +a; env`)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	cmd.Dir = ".." // config.example.env is at the module root
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("sourcing config.example.env: %v", err)
	}
	got := map[string]string{}
	for k, v := range env.ToMap(strings.Split(strings.TrimSpace(string(out)), "\n")) {
		if strings.HasPrefix(k, Prefix) {
			got[k] = v
		}
	}
	if want := readExampleEnv(t); !reflect.DeepEqual(got, want) {
		t.Errorf("sh exported\n%v\nwant\n%v", got, want)
	}
}

// TestConfigFieldsDocumented: every field has a doc comment, an env name
// and an allowed form for error messages.
func TestConfigFieldsDocumented(t *testing.T) {
	t.Parallel()
	for _, f := range configFields {
		if f.key == Prefix || f.want == "" {
			t.Errorf("field %s lacks an env or want tag", f.name)
		}
	}

	file, err := parser.ParseFile(token.NewFileSet(), "config.go", nil, parser.ParseComments)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	ast.Inspect(file, func(n ast.Node) bool {
		ts, ok := n.(*ast.TypeSpec)
		if !ok || ts.Name.Name != "Config" {
			return true
		}
		found = true
		for _, field := range ts.Type.(*ast.StructType).Fields.List {
			if field.Doc == nil || !strings.HasPrefix(field.Doc.Text(), field.Names[0].Name+" ") {
				t.Errorf("field %s has no doc comment starting with its name", field.Names[0].Name)
			}
		}
		return false
	})
	if !found {
		t.Fatal("type Config not found in config.go")
	}
}

// TestReadmeListsEveryVariable keeps the README's configuration table in
// step with Config, as TestExampleEnv does for config.example.env.
func TestReadmeListsEveryVariable(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	params, err := env.GetFieldParamsWithOptions(&Config{}, env.Options{Prefix: Prefix})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range params {
		if !strings.Contains(string(readme), "| `"+p.Key+"` |") {
			t.Errorf("README.md's configuration table has no row for %s", p.Key)
		}
	}
}
