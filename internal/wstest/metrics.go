package wstest

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// Metric gathers g and sums the series name whose labels include every
// pair of labels (name, value, name, value, ...): a counter's or gauge's
// value, a histogram's sample count. found says a series matched; one not
// (yet) there reads 0.
func Metric(t testing.TB, g prometheus.Gatherer, name string, labels ...string) (sum float64, found bool) {
	t.Helper()
	if len(labels)%2 != 0 {
		t.Fatalf("Metric %s: labels %q are not name, value pairs", name, labels)
	}
	families, err := g.Gather()
	if err != nil {
		t.Fatalf("gather metrics: %v", err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	series:
		for _, m := range f.GetMetric() {
			for i := 0; i < len(labels); i += 2 {
				if !hasLabel(m.GetLabel(), labels[i], labels[i+1]) {
					continue series
				}
			}
			found = true
			switch {
			case m.Counter != nil:
				sum += m.GetCounter().GetValue()
			case m.Gauge != nil:
				sum += m.GetGauge().GetValue()
			case m.Histogram != nil:
				sum += float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return sum, found
}

func hasLabel[L interface {
	GetName() string
	GetValue() string
}](have []L, name, value string) bool {
	for _, l := range have {
		if l.GetName() == name {
			return l.GetValue() == value
		}
	}
	return false
}
