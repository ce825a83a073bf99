package serve

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/config"
)

// fdHeadroom is the descriptors sluice holds beside its two per proxied
// connection: listeners, epoll sets, admin scrapes, certificate reads,
// stdio. PERFORMANCE.md measured about 10; 100 leaves room.
const fdHeadroom = 100

// hostLimits are the operating system's limits on how many connections
// sluice can hold (readHostLimits). Zero means unknown.
type hostLimits struct {
	noFileSoft, noFileHard uint64 // RLIMIT_NOFILE after raising the soft limit
	portLow, portHigh      int    // net.ipv4.ip_local_port_range
}

// ephemeralPorts is the number of local ports sluice can dial one backend
// address (host:port) from; 0 when unknown.
func (l hostLimits) ephemeralPorts() int {
	if l.portLow <= 0 || l.portHigh < l.portLow {
		return 0
	}
	return l.portHigh - l.portLow + 1
}

// limitWarnings says, one sentence each, where maxConns (SLUICE_MAX_CONNECTIONS,
// 0 for no limit) cannot be reached under l, and what to change. The two
// bounds: each proxied connection holds two descriptors, and one upstream
// connection, whose local port comes from the ephemeral range, which is
// per backend address because sluice dials one upstream from one source
// address.
func limitWarnings(maxConns int, l hostLimits) []string {
	var w []string
	name := config.Prefix + "MAX_CONNECTIONS"
	if l.noFileSoft > 0 {
		fit := (int64(l.noFileSoft) - fdHeadroom) / 2
		need := 2*int64(maxConns) + fdHeadroom
		switch {
		case maxConns == 0:
			w = append(w, fmt.Sprintf("%s=0 (no limit), but RLIMIT_NOFILE=%d (2 descriptors a connection + %d) fits about %d connections: past them accept fails instead of answering 503; set %s to at most %d, or raise the limit (systemd LimitNOFILE=, ulimit -n)",
				name, l.noFileSoft, fdHeadroom, max(fit, 0), name, max(fit, 0)))
		case need > int64(l.noFileSoft):
			w = append(w, fmt.Sprintf("%s=%d needs %d file descriptors (2 a connection + %d), but RLIMIT_NOFILE=%d (hard limit %d): raise it (systemd LimitNOFILE=, ulimit -n, the container runtime's nofile ulimit) or set %s to at most %d",
				name, maxConns, need, fdHeadroom, l.noFileSoft, l.noFileHard, name, max(fit, 0)))
		}
	}
	if ports := l.ephemeralPorts(); ports > 0 && (maxConns == 0 || maxConns > ports) {
		limit := strconv.Itoa(maxConns)
		if maxConns == 0 {
			limit = "0 (no limit)"
		}
		w = append(w, fmt.Sprintf("%s=%s exceeds the %d ephemeral ports (net.ipv4.ip_local_port_range %d %d) sluice can connect from to its one backend address: past them upstream dials fail (502); widen the range (sysctl net.ipv4.ip_local_port_range=\"1024 65535\") or set %s to at most %d",
			name, limit, ports, l.portLow, l.portHigh, name, ports))
	}
	return w
}

// parsePortRange reads /proc/sys/net/ipv4/ip_local_port_range's "low high".
func parsePortRange(s string) (low, high int, ok bool) {
	f := strings.Fields(s)
	if len(f) != 2 {
		return 0, 0, false
	}
	low, err1 := strconv.Atoi(f[0])
	high, err2 := strconv.Atoi(f[1])
	if err1 != nil || err2 != nil || low <= 0 || high < low {
		return 0, 0, false
	}
	return low, high, true
}

// checkHostLimits raises the descriptor limit as far as it goes, logs the
// limits that bound the connection count, and warns, naming
// SLUICE_MAX_CONNECTIONS, where it does not fit them.
func checkHostLimits(log zerolog.Logger, maxConns int) {
	l, err := readHostLimits()
	if err != nil {
		log.Warn().Err(err).Msg("could not read the host's limits")
	}
	log.Info().Int("max_connections", maxConns).
		Uint64("nofile_soft", l.noFileSoft).Uint64("nofile_hard", l.noFileHard).
		Int("ephemeral_ports", l.ephemeralPorts()).Msg("host limits")
	for _, w := range limitWarnings(maxConns, l) {
		log.Warn().Msg(w)
	}
}

// HostLimitWarnings are the warnings a start with cfg would log about this
// host's limits, for `sluice check`. Like a start, it raises the soft
// descriptor limit to the hard one.
func HostLimitWarnings(cfg config.Config) []string {
	l, err := readHostLimits()
	w := limitWarnings(cfg.MaxConnections, l)
	if err != nil {
		w = append(w, "could not read the host's limits: "+err.Error())
	}
	return w
}
