package proxy

import (
	"context"
	"net/url"
	"slices"
	"testing"

	"github.com/gobwas/ws"
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

// TestCloseCodeSeries: the cached series are closeCodes' own children.
func TestCloseCodeSeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := newMetrics(reg)
	cases := []struct {
		upstream, sent bool
		code           ws.StatusCode
		leg, dir, lbl  string
	}{
		{false, false, ws.StatusNormalClosure, "client", "received", "1000"},
		{true, true, ws.StatusGoingAway, "upstream", "sent", "1001"},
		{false, true, 1015, "client", "sent", "1015"},
		{true, false, 4000, "upstream", "received", "4xxx"},
		{false, false, 999, "client", "received", "999"},
	}
	for _, c := range cases {
		m.closeCode(c.upstream, c.sent, c.code).Inc()
		m.closeCode(c.upstream, c.sent, c.code).Inc() // cached the second time
		if got := metricValue(t, reg, "sluice_close_codes_total", "leg", c.leg, "direction", c.dir, "code", c.lbl); got != 2 {
			t.Errorf("%s %s %s = %v, want 2", c.leg, c.dir, c.lbl, got)
		}
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "sluice_close_codes_total" && len(mf.GetMetric()) != len(cases) {
			t.Errorf("%d close code series, want the %d used", len(mf.GetMetric()), len(cases))
		}
	}
}
