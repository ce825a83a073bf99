package serve

import (
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/internal/wstest"
)

// TestLimitWarnings: SLUICE_MAX_CONNECTIONS is checked against the
// descriptor limit (2 a connection + headroom) and the ephemeral ports of
// one backend address; each warning names the variable, its value, the
// limit and the value that fits.
func TestLimitWarnings(t *testing.T) {
	debian := hostLimits{noFileSoft: 1 << 20, noFileHard: 1 << 20, portLow: 32768, portHigh: 60999}
	small := hostLimits{noFileSoft: 20000, noFileHard: 20000, portLow: 32768, portHigh: 60999}
	tests := []struct {
		name     string
		maxConns int
		limits   hostLimits
		want     [][]string // substrings of each warning, in order
	}{
		{"fits", 20000, debian, nil},
		{"default against Debian's ports", 50000, debian, [][]string{
			{"SLUICE_MAX_CONNECTIONS=50000", "28232 ephemeral ports", "ip_local_port_range 32768 60999", "at most 28232"},
		}},
		{"descriptors and ports", 50000, small, [][]string{
			{"SLUICE_MAX_CONNECTIONS=50000", "needs 100100 file descriptors", "RLIMIT_NOFILE=20000", "at most 9950"},
			{"SLUICE_MAX_CONNECTIONS=50000", "28232 ephemeral ports"},
		}},
		{"just fits the descriptors", 9950, small, nil},
		{"one past them", 9951, small, [][]string{{"SLUICE_MAX_CONNECTIONS=9951", "needs 20002", "at most 9950"}}},
		{"no limit", 0, small, [][]string{
			{"SLUICE_MAX_CONNECTIONS=0 (no limit)", "RLIMIT_NOFILE=20000", "at most 9950"},
			{"SLUICE_MAX_CONNECTIONS=0 (no limit) exceeds the 28232 ephemeral ports"},
		}},
		{"limits unknown", 50000, hostLimits{}, nil},
		{"wide range", 50000, hostLimits{noFileSoft: 1 << 20, portLow: 1024, portHigh: 65535}, nil},
	}
	for _, tt := range tests {
		got := limitWarnings(tt.maxConns, tt.limits)
		if len(got) != len(tt.want) {
			t.Errorf("%s: %d warnings, want %d:\n%s", tt.name, len(got), len(tt.want), strings.Join(got, "\n"))
			continue
		}
		for i, subs := range tt.want {
			for _, sub := range subs {
				if !strings.Contains(got[i], sub) {
					t.Errorf("%s: warning %q lacks %q", tt.name, got[i], sub)
				}
			}
		}
	}
}

func TestParsePortRange(t *testing.T) {
	for in, want := range map[string][2]int{"32768\t60999\n": {32768, 60999}, "1024 65535": {1024, 65535}} {
		if low, high, ok := parsePortRange(in); !ok || low != want[0] || high != want[1] {
			t.Errorf("parsePortRange(%q) = %d, %d, %v", in, low, high, ok)
		}
	}
	for _, in := range []string{"", "32768", "a b", "60999 32768", "0 10"} {
		if _, _, ok := parsePortRange(in); ok {
			t.Errorf("parsePortRange(%q) accepted", in)
		}
	}
}

// TestStartLogsHostLimits: a start raises the descriptor limit to the hard
// one, logs it and the ephemeral ports, and warns, naming
// SLUICE_MAX_CONNECTIONS, when it cannot fit this machine's limits.
func TestStartLogsHostLimits(t *testing.T) {
	// Lower the soft limit, as a service manager may: the start raises it.
	var orig syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &orig); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &orig) })
	lowered := syscall.Rlimit{Cur: orig.Max / 2, Max: orig.Max}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lowered); err != nil {
		t.Fatal(err)
	}
	l := hostLimits{noFileSoft: orig.Max, noFileHard: orig.Max}
	// More connections than this machine's descriptors fit, whatever it is.
	tooMany := int(min(l.noFileSoft, 5_000_000))
	var logs wstest.LogBuffer
	_, _, _, stop := startSluiceLogged(t, map[string]string{
		config.Prefix + "UPSTREAM_URL":    "ws://127.0.0.1:1/",
		config.Prefix + "MAX_CONNECTIONS": strconv.Itoa(tooMany),
	}, zerolog.New(&logs))
	stop()
	var now syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &now); err != nil || now.Cur != orig.Max {
		t.Errorf("RLIMIT_NOFILE soft limit %d after the start (%v); want it raised to the hard limit %d", now.Cur, err, orig.Max)
	}
	if logs.Count(`"message":"host limits"`, `"nofile_soft":`+strconv.Itoa(int(l.noFileSoft)), `"max_connections":`+strconv.Itoa(tooMany)) != 1 {
		t.Errorf("no host limits line with nofile_soft %d:\n%s", l.noFileSoft, logs.String())
	}
	if logs.Count(`"level":"warn"`, "SLUICE_MAX_CONNECTIONS="+strconv.Itoa(tooMany)+" needs", "RLIMIT_NOFILE="+strconv.Itoa(int(l.noFileSoft))) != 1 {
		t.Errorf("no warning naming SLUICE_MAX_CONNECTIONS and the descriptor limit:\n%s", logs.String())
	}
}
