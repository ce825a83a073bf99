package admin

import (
	"github.com/prometheus/client_golang/prometheus"

	"sluice/limiter"
)

// RegisterBudgetMetrics exports the queue budget's counters and the queue
// depth histogram, read at scrape time so the frame path pays nothing for
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
		gauge("sluice_slow_clients", "Clients whose queue is at or past the slow depth.", func(s limiter.Stats) float64 { return float64(s.Slow) }),
		gauge("sluice_paused_connections", "Upstream readers paused until their client's queue drains.", func(s limiter.Stats) float64 { return float64(s.Paused) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "sluice_dropped_messages_total", Help: "Messages discarded by the drop policy."},
			func() float64 { return float64(b.Stats().DroppedTotal) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "sluice_pause_seconds_total", Help: "Time upstream readers spent paused, ended pauses."},
			func() float64 { return b.Stats().PausedTime.Seconds() }),
		&depthCollector{budget: b, buckets: []float64{0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000},
			desc: prometheus.NewDesc("sluice_queue_depth_messages",
				"Client queue depths in messages, sampled over all connections at scrape time.", nil, nil)},
	)
}

// depthCollector builds the queue depth histogram at scrape time from every
// queue, so p95/p99 depth can be read without a per-message cost.
type depthCollector struct {
	budget  *limiter.Budget
	buckets []float64 // upper bounds, ascending; never changed
	desc    *prometheus.Desc
}

func (c *depthCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *depthCollector) Collect(ch chan<- prometheus.Metric) {
	counts := make([]uint64, len(c.buckets))
	var n uint64
	var sum float64
	c.budget.Each(func(q *limiter.Queue) {
		d := float64(q.Messages())
		n++
		sum += d
		for i, ub := range c.buckets {
			if d <= ub {
				counts[i]++
			}
		}
	})
	buckets := make(map[float64]uint64, len(c.buckets))
	for i, ub := range c.buckets {
		buckets[ub] = counts[i]
	}
	ch <- prometheus.MustNewConstHistogram(c.desc, n, sum, buckets)
}
