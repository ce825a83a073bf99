//go:build linux

package main

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Reports: one markdown table per invocation, a row per target. With
// -repeat, every number is the median over the rounds and every text
// column lists each round's value when they differ.

// table accumulates a markdown table.
type table struct {
	header []string
	rows   [][]string
}

func (t *table) add(cells ...string) { t.rows = append(t.rows, cells) }

func (t *table) write(w io.Writer) {
	fmt.Fprintf(w, "| %s |\n", strings.Join(t.header, " | "))
	sep := make([]string, len(t.header))
	for i := range sep {
		sep[i] = "---"
		if i > 0 {
			sep[i] = "---:"
		}
	}
	fmt.Fprintf(w, "|%s|\n", strings.Join(sep, "|"))
	for _, r := range t.rows {
		fmt.Fprintf(w, "| %s |\n", strings.Join(r, " | "))
	}
}

// med is the median of f over rs, ignoring NaNs (NaN if none is left).
func med[R any](rs []R, f func(R) float64) float64 {
	var xs []float64
	for _, r := range rs {
		if v := f(r); !math.IsNaN(v) {
			xs = append(xs, v)
		}
	}
	if len(xs) == 0 {
		return math.NaN()
	}
	slices.Sort(xs)
	n := len(xs)
	if n%2 == 1 {
		return xs[n/2]
	}
	return (xs[n/2-1] + xs[n/2]) / 2
}

// each lists f over rs: once if every round agrees, else "a / b / c".
func each[R any](rs []R, f func(R) string) string {
	var vals []string
	for _, r := range rs {
		vals = append(vals, f(r))
	}
	if len(slices.Compact(slices.Clone(vals))) == 1 {
		return vals[0]
	}
	return strings.Join(vals, " / ")
}

// counts formats outcome counts as "5×1013 2×eof", most frequent first.
func counts[V int | float64](m map[string]V) string {
	if len(m) == 0 {
		return "—"
	}
	keys := slices.Collect(maps.Keys(m))
	slices.SortFunc(keys, func(a, b string) int {
		return cmp.Or(cmp.Compare(m[b], m[a]), strings.Compare(a, b))
	})
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%v×%s", m[k], k)
	}
	return strings.Join(parts, " ")
}

// num formats v with prec decimals, "—" for NaN.
func num(v float64, prec int) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "—"
	}
	return fmt.Sprintf("%.*f", prec, v)
}

// ms formats milliseconds with two significant decimals below 10.
func ms(v float64) string {
	if !math.IsNaN(v) && v < 10 {
		return num(v, 2)
	}
	return num(v, 1)
}

// mib formats bytes as MiB.
func mib(b float64) string { return num(b/(1<<20), 1) }

// size formats bytes with a binary unit.
func size(b float64) string {
	switch {
	case math.IsNaN(b):
		return "—"
	case b < 1<<10:
		return fmt.Sprintf("%.0f B", b)
	case b < 1<<20:
		return fmt.Sprintf("%.1f KiB", b/(1<<10))
	case b < 1<<30:
		return fmt.Sprintf("%.1f MiB", b/(1<<20))
	}
	return fmt.Sprintf("%.2f GiB", b/(1<<30))
}

// sizeName formats a message size exactly: "64 B", "1 KiB", "1536 B".
func sizeName(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d B", n)
}

// rateName formats a rate to four significant digits, without exponent:
// "10000", "50", "1.111", "0.5556".
func rateName(v float64) string {
	r, err := strconv.ParseFloat(fmt.Sprintf("%.4g", v), 64)
	if err != nil {
		return fmt.Sprint(v)
	}
	return strconv.FormatFloat(r, 'f', -1, 64)
}

// perSec formats a message rate: one decimal, three below 10 so that
// rates of a message or so a second still show.
func perSec(v float64) string {
	if !math.IsNaN(v) && v < 10 {
		return num(v, 3)
	}
	return num(v, 1)
}

// rounds describes how many rounds a row aggregates.
func rounds(r *runner) string {
	per := "target"
	if len(r.cfg.sizes) > 0 {
		per = "size and target"
	}
	if r.cfg.repeat == 1 {
		return "one run per " + per
	}
	return fmt.Sprintf("medians of %d rounds per %s (text columns list each round when they differ)", r.cfg.repeat, per)
}

func writeBroadcastReport(w io.Writer, r *runner, res [][]broadcastResult) {
	c := r.cfg
	backend := "a queue and a writer goroutine per connection, a copy of each message per connection"
	if c.shared {
		backend = "a queue and a writer goroutine per connection, one shared buffer per message"
	}
	if c.serialise {
		backend = "one goroutine writing to every connection in turn, no deadline"
	}
	matrix := len(c.sizes) > 0
	messages := fmt.Sprintf("%d-byte messages", c.size)
	if matrix {
		names := make([]string, len(c.sizes))
		for i, n := range c.sizes {
			names[i] = sizeName(n)
		}
		messages = fmt.Sprintf("messages of %s (a row per size and target)", strings.Join(names, ", "))
	}
	rate := fmt.Sprintf("%g/s to every client (%s/s in total)", c.rate, rateName(c.rate*float64(c.clients)))
	if c.totalRate > 0 {
		rate = fmt.Sprintf("%s/s in total (-total-rate), %s/s to every client", rateName(c.totalRate), rateName(c.rate))
	}
	window := c.duration.String()
	if d := broadcastWindow(c.duration, c.rate); d != c.duration {
		window = fmt.Sprintf("%v (-duration %v rounded to whole broadcast intervals of %v)",
			d.Round(time.Millisecond), c.duration, time.Duration(float64(time.Second)/c.rate).Round(time.Millisecond))
	}
	fmt.Fprintf(w, "%d clients, %.0f%% slow (SO_RCVBUF %d, MSS %d; they stop reading %v after all are connected); "+
		"%s at %s; %s per run; %s. Backend: %s.\n\n",
		c.clients, c.slow*100, c.slowRcv, c.slowMSS, c.slowAfter, messages, rate, window, rounds(r), backend)
	header := []string{"target", "clients", "slow", "backend sent msgs/s", "msgs/s per fast client", "fast p50 ms", "fast p99 ms", "fast max ms",
		"fast gaps", "fast closed", "slow clients ended", "target peak RSS MiB", "target CPU s", "backend peak RSS MiB", "backend CPU s",
		"harness CPU s", "target CPU µs/msg", "all CPU µs/msg", "backend peak per-client backlog", "backend peak queued", "sluice peak queued", "sluice evictions", "sluice dropped msgs",
		"TCP mem peak MiB", "TCP mem end MiB", "TCP orphans peak", "TCP orphans end"}
	const targetCPUCol = 16 // "target CPU µs/msg", after which the matrix puts its ratio
	if matrix {
		header = slices.Concat([]string{"size"}, header[:targetCPUCol+1], []string{"target CPU vs first proxy"}, header[targetCPUCol+1:])
	}
	t := table{header: header}
	first := math.NaN() // the first proxy's target CPU µs/msg at the size in hand
	for i, rs := range res {
		sz, spec := c.cell(i)
		if i%len(c.targets) == 0 {
			first = math.NaN()
		}
		if len(rs) == 0 {
			continue
		}
		kind := spec.kind
		sluice := kind == kindSluice
		f := func(g func(broadcastResult) float64) float64 { return med(rs, g) }
		cpuPerMsg := f(func(x broadcastResult) float64 { return perMessage(x, x.TargetCPU) })
		row := []string{rs[0].Target,
			fmt.Sprint(rs[0].Clients),
			fmt.Sprintf("%d", rs[0].Slow),
			perSec(f(func(x broadcastResult) float64 { return x.SentPerSec })),
			perSec(f(func(x broadcastResult) float64 { return x.FastMsgsPerSec })),
			ms(f(func(x broadcastResult) float64 { return float64(x.FastP50) })),
			ms(f(func(x broadcastResult) float64 { return float64(x.FastP99) })),
			ms(f(func(x broadcastResult) float64 { return float64(x.FastMax) })),
			num(f(func(x broadcastResult) float64 { return float64(x.FastGaps) }), 0),
			each(rs, func(x broadcastResult) string { return counts(x.FastCloseCounts) }),
			each(rs, func(x broadcastResult) string { return counts(x.SlowCloses) }),
			onlyIf(kind != kindDirect, mib(f(func(x broadcastResult) float64 { return float64(x.TargetPeakRSS) }))),
			onlyIf(kind != kindDirect, num(f(func(x broadcastResult) float64 { return x.TargetCPU }), 2)),
			mib(f(func(x broadcastResult) float64 { return float64(x.BackendPeakRSS) })),
			num(f(func(x broadcastResult) float64 { return x.BackendCPU }), 2),
			num(f(func(x broadcastResult) float64 { return x.HarnessCPU }), 2),
			onlyIf(kind != kindDirect, num(cpuPerMsg, 1)),
			num(f(func(x broadcastResult) float64 { return perMessage(x, x.TargetCPU+x.BackendCPU+x.HarnessCPU) }), 1),
			backlog(c, rs),
			size(f(func(x broadcastResult) float64 { return float64(x.Backend.PeakQueuedBytes) })),
			onlyIf(sluice, size(f(func(x broadcastResult) float64 { return x.SluicePeakQueued }))),
			onlyIf(sluice, each(rs, func(x broadcastResult) string { return counts(x.SluiceEvictions) })),
			onlyIf(sluice, num(f(func(x broadcastResult) float64 { return x.SluiceDropped }), 0)),
			mib(f(func(x broadcastResult) float64 { return float64(x.TCPMemPeak) })),
			mib(f(func(x broadcastResult) float64 { return float64(x.TCPMemEnd) })),
			num(f(func(x broadcastResult) float64 { return float64(x.TCPOrphanPeak) }), 0),
			num(f(func(x broadcastResult) float64 { return float64(x.TCPOrphanEnd) }), 0),
		}
		if matrix {
			if kind != kindDirect && math.IsNaN(first) {
				first = cpuPerMsg
			}
			ratio := "—"
			if kind != kindDirect && first > 0 {
				ratio = num(cpuPerMsg/first, 2) + "×"
			}
			row = slices.Concat([]string{sizeName(sz)}, row[:targetCPUCol+1], []string{ratio}, row[targetCPUCol+1:])
		}
		t.add(row...)
	}
	t.write(w)
	if matrix {
		fmt.Fprint(w, `
- size: bytes per message (-sizes); rows grouped by size, targets in the order given. Every run
  has a fresh backend and target. target CPU vs first proxy: target CPU µs/msg divided by that of
  the first target at the same size that is not direct (so 1.00× on its own row).`)
	}
	fmt.Fprint(w, `
- backend sent msgs/s: what the backend broadcast per second during the measured window (below
  -rate when it fell over a second behind: a starved machine, or a blocked -serialise loop).
- msgs/s per fast client, latency (receive time minus the backend's send stamp, same clock) and
  gaps (sequence numbers skipped) cover the fast clients during the window; fast closed: fast
  clients whose connection ended during it.
- slow clients ended: how each slow client's connection ended as it read on for -close-wait after
  the window: the close code received, eof (no close frame), rst (reset) or open.
- CPU: user+system seconds of each process group during the window (harness: the clients, which
  share the CPUs with everything else). Peak RSS: the highest sample (every 200 ms), or VmHWM.
- CPU µs/msg: CPU per message delivered to a fast client, the fair figure when targets deliver
  different rates (a -serialise backend slows to what the slowest socket takes). target: the
  proxy's own; all: target, backend and harness together. On loopback the kernel's work for a
  packet (the receiver's TCP processing, waking it) is charged to whichever process sent it or
  read it and so opened a window, so how a proxy sizes its reads and writes moves CPU between it
  and its peers; the sum is the figure no such attribution changes.
- backend backlog: bytes (messages) queued or being written for one connection; queued: all
  connections together. sluice peak queued: sluice_queued_bytes, sampled every 200 ms.
- TCP mem: the kernel's TCP socket memory of the whole machine (/proc/net/sockstat "mem", pages
  times the page size; every socket's buffers, both ends of every connection, not only the
  target's), sampled every 200 ms from just before the clients connect to the end of -close-wait,
  minus its value just before they connect: the peak, and at the end (memory still held, e.g.
  by orphans). TCP orphans: sockets closed by their process but still holding unsent data
  (absolute count, machine-wide), highest sampled and at the end of -close-wait.
`)
}

// perMessage is cpu seconds in microseconds per message delivered to a
// fast client during the window.
func perMessage(x broadcastResult, cpu float64) float64 {
	if x.FastReceived == 0 {
		return 0
	}
	return cpu * 1e6 / float64(x.FastReceived)
}

// backlog formats the backend's peak per-client backlog in bytes and
// messages.
func backlog(c config, rs []broadcastResult) string {
	if c.serialise {
		return "— (no queues)"
	}
	b := med(rs, func(x broadcastResult) float64 { return float64(x.Backend.PeakBacklogBytes) })
	m := med(rs, func(x broadcastResult) float64 { return float64(x.Backend.PeakBacklogMessages) })
	return fmt.Sprintf("%s (%s msgs)", size(b), num(m, 0))
}

// onlyIf is s, or "—" when not applicable.
func onlyIf(ok bool, s string) string {
	if !ok {
		return "—"
	}
	return s
}

func writeIdleReport(w io.Writer, r *runner, res [][]idleResult) {
	fmt.Fprintf(w, "%d idle connections (sources 127.0.0.2-255), held %v after connecting; %s.\n\n",
		r.cfg.clients, r.cfg.duration, rounds(r))
	t := table{header: []string{"target", "conns", "connect s", "failed or dropped while connecting", "target RSS KiB/conn (connected)",
		"target RSS KiB/conn (end of hold)", "Go heap KiB/conn", "Go stack KiB/conn", "Go runtime KiB/conn", "heap free, retained KiB/conn", "goroutines", "target CPU s (hold)",
		"harness CPU s (hold)", "pings/conn (hold)", "dropped (hold)", "backend RSS KiB/conn"}}
	for i, rs := range res {
		if len(rs) == 0 {
			continue
		}
		kind := r.cfg.targets[i].kind
		sluice := kind == kindSluice
		f := func(g func(idleResult) float64) float64 { return med(rs, g) }
		t.add(rs[0].Target,
			num(f(func(x idleResult) float64 { return float64(x.Conns) }), 0),
			num(f(func(x idleResult) float64 { return x.ConnectSecs }), 1),
			num(f(func(x idleResult) float64 { return float64(x.ConnectErrors + x.EarlyDisconnects) }), 0),
			onlyIf(kind != kindDirect, num(f(func(x idleResult) float64 {
				return x.perConn(float64(x.TargetRSSBefore), float64(x.TargetRSSConnected))
			}), 1)),
			onlyIf(kind != kindDirect, num(f(func(x idleResult) float64 { return x.perConn(float64(x.TargetRSSBefore), float64(x.TargetRSSEnd)) }), 1)),
			onlyIf(sluice, num(f(func(x idleResult) float64 { return x.perConn(x.HeapBefore, x.HeapEnd) }), 2)),
			onlyIf(sluice, num(f(func(x idleResult) float64 { return x.perConn(x.StackBefore, x.StackEnd) }), 2)),
			onlyIf(sluice, num(f(func(x idleResult) float64 { return x.perConn(x.RuntimeBefore, x.RuntimeEnd) }), 2)),
			onlyIf(sluice, num(f(func(x idleResult) float64 { return x.perConn(x.HeapFreeBefore, x.HeapFreeEnd) }), 2)),
			onlyIf(sluice, num(f(func(x idleResult) float64 { return x.Goroutines }), 0)),
			onlyIf(kind != kindDirect, num(f(func(x idleResult) float64 { return x.TargetHoldCPU }), 2)),
			num(f(func(x idleResult) float64 { return x.HarnessHoldCPU }), 2),
			num(f(func(x idleResult) float64 { return x.PingsPerConn }), 1),
			each(rs, func(x idleResult) string {
				if x.HoldDisconnects == 0 {
					return "0"
				}
				return fmt.Sprintf("%d (%s)", x.HoldDisconnects, counts(x.DisconnectCodes))
			}),
			num(f(func(x idleResult) float64 {
				return x.perConn(float64(x.BackendRSSBefore), float64(x.BackendRSSConnected))
			}), 1),
		)
	}
	t.write(w)
	fmt.Fprint(w, `
- RSS per connection: the target's resident set (whole process group) once all are connected
  (and at the end of the hold) minus before the first, divided by the connections. Go heap and
  stack: go_memstats_heap_inuse_bytes and go_memstats_stack_inuse_bytes from sluice's /metrics,
  end of hold minus before, per connection. Go runtime: its own bookkeeping (mspan, mcache,
  GC, profiling buckets and other _sys bytes). Heap free, retained: heap_idle - heap_released,
  pages the collector freed but has not returned to the OS.
- CPU: user+system seconds of the target during the hold only. pings/conn: pings the clients
  received and answered during the hold. dropped: connections that ended during the hold
  (must be 0).
`)
}

func writeHandshakeReport(w io.Writer, r *runner, res [][]handshakeResult) {
	fmt.Fprintf(w, "%d workers, each: connect (sources 127.0.0.2-255), upgrade, close 1000 and wait for the echo; %v per run; %s.\n\n",
		r.cfg.workers, r.cfg.duration, rounds(r))
	t := table{header: []string{"target", "workers", "upgrades/s", "p50 ms", "p99 ms", "max ms", "errors", "close not 1000",
		"target CPU s", "target CPU µs/upgrade", "backend CPU s", "harness CPU s"}}
	for i, rs := range res {
		if len(rs) == 0 {
			continue
		}
		kind := r.cfg.targets[i].kind
		f := func(g func(handshakeResult) float64) float64 { return med(rs, g) }
		t.add(rs[0].Target,
			fmt.Sprint(rs[0].Workers),
			num(f(func(x handshakeResult) float64 { return x.Rate }), 0),
			ms(f(func(x handshakeResult) float64 { return float64(x.P50) })),
			ms(f(func(x handshakeResult) float64 { return float64(x.P99) })),
			ms(f(func(x handshakeResult) float64 { return float64(x.Max) })),
			each(rs, func(x handshakeResult) string {
				if x.Errors == 0 {
					return "0"
				}
				return fmt.Sprintf("%d (%s)", x.Errors, counts(x.ErrorKinds))
			}),
			num(f(func(x handshakeResult) float64 { return float64(x.CloseNot1000) }), 0),
			onlyIf(kind != kindDirect, num(f(func(x handshakeResult) float64 { return x.TargetCPU }), 2)),
			onlyIf(kind != kindDirect, num(f(func(x handshakeResult) float64 { return x.TargetCPU / float64(x.Handshakes) * 1e6 }), 0)),
			num(f(func(x handshakeResult) float64 { return x.BackendCPU }), 2),
			num(f(func(x handshakeResult) float64 { return x.HarnessCPU }), 2),
		)
	}
	t.write(w)
	fmt.Fprint(w, `
- latency: from starting the TCP connect to the 101 response; CPU: user+system seconds of the
  process group during the run. The harness shares the CPUs with the target and the backend.
`)
}

// writeJSON writes every run's results to -json.
func writeJSON[R any](r *runner, res [][]R) error {
	out := struct {
		Command string `json:"command"`
		Mode    string `json:"mode"`
		Sizes   []int  `json:"sizes,omitempty"` // -sizes
		// Results are by target, then round; with -sizes, by size, then
		// target, then round: size i, target j at i*len(targets)+j.
		Results [][]R `json:"results"`
	}{r.cfg.command, r.cfg.mode, r.cfg.sizes, res}
	b, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(r.cfg.jsonPath, append(b, '\n'), 0o644)
}

func writeInboundReport(w io.Writer, r *runner, res [][]inboundResult) {
	c := r.cfg
	fmt.Fprintf(w, "%d normal clients, each sending %d-byte messages at %g/s; -flooders %d (a target's flooders=N wins) sending as fast as "+
		"%d unanswered messages allow; an echo backend spending %v of busy CPU per message; %v warm-up, then %v measured; %s.\n\n",
		c.clients, c.size, c.rate, c.flooders, c.window, c.work, inboundWarmup, c.duration, rounds(r))
	t := table{header: []string{"target", "normal", "flooders", "backend msgs/s", "flooder msgs/s at backend", "normal msgs/s at backend",
		"normal share min–max (× median)", "normal p50 ms", "normal p99 ms", "normal max ms", "lost normal", "lost flooder",
		"out of order", "closed", "target RSS start → end MiB", "target CPU s", "backend CPU s", "backend CPU µs/msg",
		"harness CPU s", "sluice delayed msgs"}}
	for i, rs := range res {
		if len(rs) == 0 {
			continue
		}
		kind := r.cfg.targets[i].kind
		f := func(g func(inboundResult) float64) float64 { return med(rs, g) }
		t.add(rs[0].Target,
			fmt.Sprint(rs[0].Clients),
			fmt.Sprint(rs[0].Flooders),
			num(f(func(x inboundResult) float64 { return x.BackendPerSec }), 0),
			onlyIf(rs[0].Flooders > 0, num(f(func(x inboundResult) float64 { return x.FlooderPerSec }), 1)),
			num(f(func(x inboundResult) float64 { return x.NormalPerSec }), 0),
			num(f(func(x inboundResult) float64 { return x.ShareMin }), 3)+"–"+num(f(func(x inboundResult) float64 { return x.ShareMax }), 3),
			ms(f(func(x inboundResult) float64 { return float64(x.NormalP50) })),
			ms(f(func(x inboundResult) float64 { return float64(x.NormalP99) })),
			ms(f(func(x inboundResult) float64 { return float64(x.NormalMax) })),
			each(rs, func(x inboundResult) string { return fmt.Sprint(x.NormalLost) }),
			each(rs, func(x inboundResult) string { return fmt.Sprint(x.FlooderLost) }),
			each(rs, func(x inboundResult) string { return fmt.Sprint(x.Disorder) }),
			each(rs, func(x inboundResult) string { return closedOf(x) }),
			onlyIf(kind != kindDirect, mib(f(func(x inboundResult) float64 { return float64(x.TargetRSSStart) }))+" → "+
				mib(f(func(x inboundResult) float64 { return float64(x.TargetRSSEnd) }))),
			onlyIf(kind != kindDirect, num(f(func(x inboundResult) float64 { return x.TargetCPU }), 2)),
			num(f(func(x inboundResult) float64 { return x.BackendCPU }), 2),
			num(f(func(x inboundResult) float64 { return x.BackendCPU / float64(x.BackendEchoed) * 1e6 }), 0),
			num(f(func(x inboundResult) float64 { return x.HarnessCPU }), 2),
			onlyIf(kind == kindSluice, each(rs, func(x inboundResult) string { return counts(roundAll(x.SluiceDelayed)) })),
		)
	}
	t.write(w)
	fmt.Fprint(w, `
- At the backend, during the measured window (from its per-client counts): messages per second
  from all clients, from the flooders together, and from the normal clients together; normal
  share: the fewest and the most messages one normal client got to the backend, divided by the
  median client's.
- normal p50/p99/max: from a normal client's send stamp to its echo, echoes read in the window.
- lost: messages sent in the whole run (warm-up included) that never came back, after the
  senders stop and the harness waits for the echoes due (until all came, none came for 3 s, or
  30 s); a flooder closed by a limit loses what it had in flight. out of order: echoes whose
  sequence number went back. closed: connections ended by the target or the backend
  (n×code), normal ones then flooders.
- target RSS: the target's resident set at the start and at the end of the window. CPU:
  user+system seconds during the window; backend CPU µs/msg: its CPU divided by the messages it
  echoed then (at least -work, which is a calibrated busy loop, plus reading and writing).
- sluice delayed msgs: sluice_messages_delayed_total by limit over the whole run (client_rate:
  a client's own rate; upstream_cap: the cap on all clients together).
`)
}

// closedOf formats the connections a target or backend ended.
func closedOf(x inboundResult) string {
	if len(x.NormalEnded) == 0 && len(x.FloodEnded) == 0 {
		return "0"
	}
	return fmt.Sprintf("normal %s, flooders %s", counts(x.NormalEnded), counts(x.FloodEnded))
}

// roundAll rounds every value of m to a whole number.
func roundAll(m map[string]float64) map[string]float64 {
	out := make(map[string]float64, len(m))
	for k, v := range m {
		out[k] = math.Round(v)
	}
	return out
}
