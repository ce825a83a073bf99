package proxy

import (
	"testing"

	"github.com/gobwas/ws"
	"github.com/prometheus/client_golang/prometheus"
)

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
