package proxy

import (
	"strconv"
	"sync/atomic"

	"github.com/gobwas/ws"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sluice-proxy/sluice/frontdoor"
)

// Metrics are the proxy's Prometheus series. They are registered into the
// registerer given to New; nothing here is global.
type Metrics struct {
	connectionsActive prometheus.Gauge
	connectionsTotal  prometheus.Counter
	rejected          *prometheus.CounterVec
	handshakeSeconds  prometheus.Histogram
	dialFailures      *prometheus.CounterVec
	messages          [2]prometheus.Counter // by direction
	bytes             [2]prometheus.Counter // by direction
	closeCodes        *prometheus.CounterVec
	evictions         *prometheus.CounterVec
	protocolErrors    *prometheus.CounterVec
	pingsSent         prometheus.Counter
	queueWaitSeconds  prometheus.Histogram
	sessionSeconds    prometheus.Histogram
	// Pass-through requests, by status class, and their durations.
	httpRequests       *prometheus.CounterVec
	httpSeconds        prometheus.Histogram
	upstreamPingsSent  prometheus.Counter
	upstreamPongMissed prometheus.Counter
	// upstreamClosedFirst counts upstream connections whose backend did
	// not close TCP first after the close handshake: sluice did, and the
	// TIME_WAIT is on its side.
	upstreamClosedFirst prometheus.Counter
	// panics counts panics recovered, by the goroutine's role
	// (panicRoles).
	panics *prometheus.CounterVec
	// Inbound limits, by limit (limitNames): frames held back, and for how
	// long in all.
	delayed         [2]prometheus.Counter
	throttleSeconds [2]prometheus.Counter

	// closeCodeSeries caches closeCodes' children for 1000–1015 by leg
	// and direction: every session ends with about four closes, and a
	// lookup by label values hashes the labels and formats the code each
	// time. Filled on first use, so /metrics shows only codes seen.
	closeCodeSeries [2][2][16]atomic.Pointer[counterSeries]
}

type counterSeries struct{ prometheus.Counter }

// Direction labels: upstream_to_client is the queued, policed direction.
const (
	toClient   = 0
	toUpstream = 1
)

var directionNames = [2]string{toClient: "upstream_to_client", toUpstream: "client_to_upstream"}

func newMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		connectionsActive: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sluice_connections_active", Help: "Proxied WebSocket sessions open now.",
		}),
		connectionsTotal: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_connections_accepted_total", Help: "Upgrade requests that became proxied sessions.",
		}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_connections_rejected_total", Help: "Upgrade requests answered without a session, by reason.",
		}, []string{"reason"}),
		handshakeSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "sluice_handshake_duration_seconds", Help: "Time from the client's request to sluice's 101, upstream dial included.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		dialFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_upstream_dial_failures_total", Help: "Upstream connections that failed before a 101, by reason.",
		}, []string{"reason"}),
		closeCodes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_close_codes_total", Help: "Close frames by leg (client, upstream), direction (sent, received) and code; application codes are grouped as 3xxx and 4xxx.",
		}, []string{"leg", "direction", "code"}),
		evictions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_evictions_total", Help: "Clients closed by sluice to protect the process or the backend, by reason.",
		}, []string{"reason"}),
		protocolErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_protocol_errors_total", Help: "Connections failed for breaking RFC 6455, by leg and close code sent.",
		}, []string{"leg", "code"}),
		pingsSent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_pings_sent_total", Help: "Keepalive pings sluice sent to clients.",
		}),
		upstreamPingsSent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_upstream_pings_sent_total", Help: "Keepalive pings sluice sent to the upstream.",
		}),
		upstreamPongMissed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_upstream_pong_timeouts_total", Help: "Upstream legs closed because the upstream stopped answering pings.",
		}),
		upstreamClosedFirst: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_upstream_closed_first_total", Help: "Upstream connections sluice closed first after the close handshake, because the backend had not within 500ms (each leaves a TIME_WAIT socket on sluice's side).",
		}),
		queueWaitSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "sluice_queue_wait_seconds", Help: "Time a message waited in a client's queue before its writer took it.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}),
		sessionSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "sluice_session_duration_seconds", Help: "Lifetime of proxied sessions.",
			Buckets: prometheus.ExponentialBuckets(1, 4, 10),
		}),
		httpRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_http_requests_total", Help: "Plain HTTP requests passed through to the upstream, by status class (2xx to 5xx; a client gone before the answer counts as 4xx, 499).",
		}, []string{"code"}),
		httpSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "sluice_http_request_duration_seconds", Help: "Time from a passed-through request to the end of its answer (streams and downloads included).",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
		}),
	}
	msgs := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_messages_total", Help: "Data messages forwarded, by direction.",
	}, []string{"direction"})
	byts := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_bytes_total", Help: "Frame bytes forwarded (headers and payload), by direction.",
	}, []string{"direction"})
	for d, name := range directionNames {
		m.messages[d] = msgs.WithLabelValues(name)
		m.bytes[d] = byts.WithLabelValues(name)
	}
	delayed := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_messages_delayed_total", Help: "Client frames held back by an inbound limit, by limit (client_rate, upstream_cap).",
	}, []string{"limit"})
	throttle := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_throttle_seconds_total", Help: "Time client readers spent stopped by an inbound limit, by limit (client_rate, upstream_cap).",
	}, []string{"limit"})
	for l, name := range limitNames {
		m.delayed[l] = delayed.WithLabelValues(name)
		m.throttleSeconds[l] = throttle.WithLabelValues(name)
	}
	// Every series whose label values are known exists from the start, at
	// 0, so that rate() and alerts see the first event and need no
	// absent().
	for _, r := range rejectionReasons() {
		m.rejected.WithLabelValues(r)
	}
	for _, r := range dialFailureReasons {
		m.dialFailures.WithLabelValues(r)
	}
	for _, r := range evictionReasons() {
		m.evictions.WithLabelValues(r)
	}
	for _, c := range frontdoor.FinalStatusClasses() {
		m.httpRequests.WithLabelValues(c)
	}
	m.panics = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_panics_total",
		Help: "Panics recovered, by where: the session (or handshake) ended, the process and every other session did not.",
	}, []string{"where"})
	for _, r := range panicRoles {
		m.panics.WithLabelValues(r)
	}
	for _, leg := range []string{"client", "upstream"} {
		for _, code := range violationCodes {
			m.protocolErrors.WithLabelValues(leg, closeCodeLabel(code))
		}
	}
	if reg != nil {
		reg.MustRegister(m.connectionsActive, m.connectionsTotal, m.rejected, m.handshakeSeconds,
			m.dialFailures, msgs, byts, m.closeCodes, m.evictions, m.protocolErrors, m.pingsSent,
			m.upstreamPingsSent, m.upstreamPongMissed, m.upstreamClosedFirst, m.queueWaitSeconds, m.sessionSeconds,
			delayed, throttle, m.httpRequests, m.httpSeconds, m.panics)
	}
	return m
}

// registerThrottled exports the number of clients an inbound limit held
// back within the last second, counted at scrape time.
func (m *Metrics) registerThrottled(reg prometheus.Registerer, count func() float64) {
	if reg == nil {
		return
	}
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "sluice_throttled_clients", Help: "Clients held back by an inbound limit within the last second.",
	}, count))
}

// dialFailureReasons are the labels of sluice_upstream_dial_failures_total
// (dialFailure).
var dialFailureReasons = []string{"timeout", "refused", "client_gone", "status", "unreachable", "handshake"}

// violationCodes are the close codes a protocol violation earns
// (frame.Error), the code label of sluice_protocol_errors_total.
var violationCodes = []ws.StatusCode{ws.StatusProtocolError, ws.StatusInvalidFramePayloadData, ws.StatusMessageTooBig}

// rejectionReasons are the labels of sluice_connections_rejected_total:
// admission control's refusals, malformed or late upgrades, and each way
// the upstream can fail a handshake (Server.dialFailed).
func rejectionReasons() []string {
	out := []string{"bad_request", "malformed", "header_too_large", "draining", "client_handshake", "upstream_status", "proxy_protocol",
		"upstream_queue_timeout", "upstream_queue_full"}
	out = append(out, frontdoor.AdmissionReasons()...)
	for _, r := range dialFailureReasons {
		if r != "client_gone" && r != "status" {
			out = append(out, "upstream_"+r)
		}
	}
	return out
}

// closeCode is the sluice_close_codes_total series for a close frame on
// the upstream leg or not, sent by sluice or received.
func (m *Metrics) closeCode(upstream, sent bool, code ws.StatusCode) prometheus.Counter {
	leg, dir := "client", "received"
	if upstream {
		leg = "upstream"
	}
	if sent {
		dir = "sent"
	}
	if code < 1000 || code > 1015 {
		return m.closeCodes.WithLabelValues(leg, dir, closeCodeLabel(code))
	}
	slot := &m.closeCodeSeries[b2i(upstream)][b2i(sent)][code-1000]
	if c := slot.Load(); c != nil {
		return c.Counter
	}
	c := &counterSeries{m.closeCodes.WithLabelValues(leg, dir, closeCodeLabel(code))}
	slot.Store(c) // a racing store holds the same child
	return c.Counter
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// closeCodeLabel keeps the code label's cardinality small.
func closeCodeLabel(c ws.StatusCode) string {
	switch {
	case c >= 3000 && c < 4000:
		return "3xxx"
	case c >= 4000 && c < 5000:
		return "4xxx"
	}
	return strconv.Itoa(int(c))
}
