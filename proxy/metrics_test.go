package proxy

import (
	"context"
	"net/url"
	"slices"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// Every counter whose label values are known is exported at 0 from the
// start, so that rate() and alerts see its first event.
func TestKnownLabelsAtZero(t *testing.T) {
	reg := prometheus.NewRegistry()
	u, _ := url.Parse("ws://127.0.0.1:1")
	srv, err := New(Options{Upstream: u, Logger: zerolog.Nop(), Registerer: reg, NoIdlePoll: true})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown(context.Background())
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string][]string{} // family -> "label=value,..." of each series at 0
	for _, f := range families {
		for _, m := range f.GetMetric() {
			if m.GetCounter().GetValue() != 0 {
				t.Errorf("%s starts at %v", f.GetName(), m.GetCounter().GetValue())
			}
			var key string
			for _, l := range m.GetLabel() {
				key += l.GetName() + "=" + l.GetValue() + ","
			}
			seen[f.GetName()] = append(seen[f.GetName()], key)
		}
	}
	want := map[string][]string{
		"sluice_evictions_total":              {"reason=slow,", "reason=global_ceiling,", "reason=slow_ratio,", "reason=write_timeout,", "reason=pong_timeout,", "reason=pause_timeout,", "reason=read_timeout,", "reason=rate_limit,"},
		"sluice_messages_delayed_total":       {"limit=client_rate,", "limit=upstream_cap,"},
		"sluice_throttle_seconds_total":       {"limit=client_rate,", "limit=upstream_cap,"},
		"sluice_upstream_dial_failures_total": {"reason=timeout,", "reason=refused,", "reason=unreachable,", "reason=handshake,", "reason=status,", "reason=client_gone,"},
		"sluice_connections_rejected_total":   {"reason=bad_request,", "reason=draining,", "reason=origin,", "reason=max_connections,", "reason=max_connections_per_ip,", "reason=rate_limit,", "reason=upstream_status,", "reason=upstream_timeout,", "reason=upstream_refused,", "reason=upstream_unreachable,", "reason=upstream_handshake,", "reason=client_handshake,"},
		"sluice_protocol_errors_total":        {"code=1002,leg=client,", "code=1007,leg=client,", "code=1009,leg=client,", "code=1002,leg=upstream,"},
	}
	for family, series := range want {
		for _, s := range series {
			if !slices.Contains(seen[family], s) {
				t.Errorf("%s{%s} is not exported at start; have %v", family, s, seen[family])
			}
		}
	}
}
