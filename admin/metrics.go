package admin

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluice-proxy/sluice/limiter"
	"github.com/sluice-proxy/sluice/version"
)

// RegisterBuildInfo exports sluice_build_info, 1 with the build's
// version, commit and Go release as labels, as Prometheus's own
// prometheus_build_info: join on it to see which build a pod runs.
func RegisterBuildInfo(reg prometheus.Registerer, info version.Info) {
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "sluice_build_info",
		Help: "Always 1; its labels name the running build (version, commit, goversion).",
		ConstLabels: prometheus.Labels{
			"version":   info.Version,
			"commit":    info.Commit,
			"goversion": info.GoVersion,
		},
	})
	g.Set(1)
	reg.MustRegister(g)
}

// RegisterBudgetMetrics exports the queue budget's counters and the queue
// depth gauges, read at scrape time so the frame path pays nothing for
// them. The proxy registers its per-session metrics itself.
func RegisterBudgetMetrics(reg prometheus.Registerer, b *limiter.Budget) {
	gauge := func(name, help string, f func(limiter.Stats) float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 { return f(b.Stats()) })
	}
	// One series per direction, the same help for both, as one metric.
	const unsentHelp = "Bytes the kernel holds unacknowledged (Linux SIOCOUTQ, sampled every 50 ms) toward the clients or toward the backend, part of sluice_queued_bytes."
	unsent := func(direction string, f func(limiter.Stats) int64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sluice_unsent_bytes", Help: unsentHelp, ConstLabels: prometheus.Labels{"direction": direction}},
			func() float64 { return float64(f(b.Stats())) })
	}
	reg.MustRegister(
		gauge("sluice_queued_bytes", "Bytes waiting in all queues, both directions, what the kernel holds unacknowledged for the clients and the backend included.", func(s limiter.Stats) float64 { return float64(s.QueuedBytes) }),
		unsent("client", func(s limiter.Stats) int64 { return s.UnsentBytes }),
		unsent("upstream", func(s limiter.Stats) int64 { return s.UpstreamUnsentBytes }),
		gauge("sluice_queue_ceiling_bytes", "The global ceiling on queued bytes (0: none).", func(s limiter.Stats) float64 { return float64(s.Ceiling) }),
		gauge("sluice_queued_bytes_ratio", "Queued bytes as a share of the ceiling.", func(s limiter.Stats) float64 {
			if s.Ceiling == 0 {
				return 0
			}
			return float64(s.QueuedBytes) / float64(s.Ceiling)
		}),
		gauge("sluice_slow_clients", "Clients that have taken nothing for SLUICE_SLOW_CLIENT_AGE while data waited for them.", func(s limiter.Stats) float64 { return float64(s.Slow) }),
		gauge("sluice_paused_connections", "Upstream readers paused until their client's queue drains.", func(s limiter.Stats) float64 { return float64(s.Paused) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "sluice_dropped_messages_total", Help: "Messages discarded by the drop policy."},
			func() float64 { return float64(b.Stats().DroppedTotal) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "sluice_pause_seconds_total", Help: "Time upstream readers spent paused, ended pauses."},
			func() float64 { return b.Stats().PausedTime.Seconds() }),
		newDepthCollector(b),
	)
}

// depthCollector reads every client queue's depth at scrape time, so the
// frame path pays nothing for it, and exports what a snapshot can honestly
// be: gauges. (A histogram rebuilt at each scrape has bucket counts that
// fall, which rate() and histogram_quantile() read as counter resets.)
type depthCollector struct {
	budget     *limiter.Budget
	max        *prometheus.Desc
	deeper     *prometheus.Desc
	thresholds []int    // ascending; set by newDepthCollector, never changed
	labels     []string // thresholds as label values, formatted once
}

func newDepthCollector(b *limiter.Budget) *depthCollector {
	c := &depthCollector{
		budget: b,
		max: prometheus.NewDesc("sluice_queue_depth_max_messages",
			"The deepest client queue, in messages, at scrape time.", nil, nil),
		deeper: prometheus.NewDesc("sluice_clients_queue_deeper_than",
			"Clients whose queue holds more than the label's number of messages, at scrape time.", []string{"messages"}, nil),
		// 5 marks a client a few messages behind, 100 the default high-water mark.
		thresholds: []int{0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000},
	}
	for _, d := range c.thresholds {
		c.labels = append(c.labels, strconv.Itoa(d))
	}
	return c
}

func (c *depthCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.max; ch <- c.deeper }

func (c *depthCollector) Collect(ch chan<- prometheus.Metric) {
	counts := make([]int, len(c.thresholds))
	deepest := 0
	c.budget.Each(func(q *limiter.Queue) {
		d := q.Messages()
		deepest = max(deepest, d)
		for i, t := range c.thresholds {
			if d <= t {
				break
			}
			counts[i]++
		}
	})
	ch <- prometheus.MustNewConstMetric(c.max, prometheus.GaugeValue, float64(deepest))
	for i, n := range counts {
		ch <- prometheus.MustNewConstMetric(c.deeper, prometheus.GaugeValue, float64(n), c.labels[i])
	}
}
