package demo

import (
	"fmt"
	"io"
	"maps"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/sluice-proxy/sluice/admin"
	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/internal/latency"
	"github.com/sluice-proxy/sluice/limiter"
)

// floodLastSecond is the flooder's messages at the backend since the last
// screen, about a second ago.
func (p *phase) floodLastSecond() int64 {
	n := p.backend.Stats().PeakConnReceived
	delta := n - p.lastFlood
	p.lastFlood = n
	return delta
}

// drawDirect prints one refresh of the phase without sluice.
func (d *demo) drawDirect(p *phase, elapsed time.Duration) {
	o := d.opts
	lat := p.fleet.lastLat.Swap(new(latency.Histogram))
	bq, bmax := p.backend.Stats().QueuedBytes, p.backend.LargestBacklog()
	flood := p.floodLastSecond()
	sec := elapsed.Round(time.Second)
	if !d.tty {
		fmt.Fprintf(d.out, "%3ds backend_queued=%s backend_max=%s heap=%s", int(sec.Seconds()),
			compactBytes(bq), compactBytes(bmax), compactBytes(int64(heapBytes())))
		if p.flood != nil {
			fmt.Fprintf(d.out, " flood_at_backend=%d/s", flood)
		}
		fmt.Fprintf(d.out, " p99=%s delivered=%d gaps=%d\n", ms(lat.Quantile(0.99)), p.fleet.fastMsgs.Load(), p.fleet.fastGaps.Load())
		return
	}
	var b strings.Builder
	b.WriteString("\x1b[H\x1b[2J") // home, clear
	fmt.Fprintf(&b, "sluice demo   1. without sluice   %s of %s\n\n", sec, o.duration)
	fmt.Fprintf(&b, "clients       %d fast, %d slow (they stop reading after their first message)\n", o.clients-o.nSlow(), o.nSlow())
	fmt.Fprintf(&b, "backend       queued %s   largest client backlog %s   (no bound)\n", humanBytes(bq), humanBytes(bmax))
	fmt.Fprintf(&b, "              Go heap of the whole demo %s\n", humanBytes(int64(heapBytes())))
	if p.flood != nil {
		fmt.Fprintf(&b, "flooder       %s messages reached the backend in the last second (no limit)\n", thousands(uint64(flood)))
	}
	fmt.Fprintf(&b, "fast clients  latency p99 %s (last second)   %s messages delivered\n\n", ms(lat.Quantile(0.99)), thousands(p.fleet.fastMsgs.Load()))
	b.WriteString("Then the same clients through sluice. Ctrl-C stops early and prints the summary.\n")
	io.WriteString(d.out, b.String())
}

// draw prints one refresh of the phase through sluice: a screen on a
// terminal, else one line.
func (d *demo) draw(p *phase, elapsed time.Duration, st *admin.Status, stErr error) {
	o := d.opts
	lat := p.fleet.lastLat.Swap(new(latency.Histogram))
	bq, bmax := p.backend.Stats().QueuedBytes, p.backend.LargestBacklog()
	fastMsgs, fastGaps := p.fleet.fastMsgs.Load(), p.fleet.fastGaps.Load()
	flood := p.floodLastSecond()
	sec := elapsed.Round(time.Second)

	if !d.tty {
		var b strings.Builder
		fmt.Fprintf(&b, "%3ds", int(sec.Seconds()))
		if st != nil {
			t := st.Totals
			fmt.Fprintf(&b, " conns=%d slow=%d paused=%d queued=%s", t.Connections, t.Slow, t.Paused, compactBytes(t.QueuedBytes))
			if t.Ceiling > 0 {
				fmt.Fprintf(&b, "(%.1f%%)", 100*t.Share)
			}
			fmt.Fprintf(&b, " evictions=%s dropped=%d throttled=%d", evictionLine(t, "="), t.Dropped, t.Throttled)
		} else {
			fmt.Fprintf(&b, " status=unavailable(%v)", stErr)
		}
		fmt.Fprintf(&b, " backend_queued=%s backend_max=%s", compactBytes(bq), compactBytes(bmax))
		if p.flood != nil {
			fmt.Fprintf(&b, " flood_at_backend=%d/s", flood)
		}
		if lat.Count() > 0 {
			fmt.Fprintf(&b, " p50=%s p99=%s max=%s", ms(lat.Quantile(0.5)), ms(lat.Quantile(0.99)), ms(lat.Max()))
		} else {
			b.WriteString(" p50=- p99=- max=-")
		}
		fmt.Fprintf(&b, " delivered=%d gaps=%d", fastMsgs, fastGaps)
		fmt.Fprintln(d.out, b.String())
		return
	}

	var b strings.Builder
	b.WriteString("\x1b[H\x1b[2J") // home, clear
	fmt.Fprintf(&b, "status page: http://%s\n\n", strings.TrimSuffix(strings.TrimPrefix(d.statusURL, "http://"), ".json"))
	fmt.Fprintf(&b, "sluice demo   through sluice, policy %s   %s of %s\n\n", o.policy, sec, o.duration)
	fmt.Fprintf(&b, "clients       %d fast, %d slow (they stop reading after their first message, for %s)\n",
		o.clients-o.nSlow(), o.nSlow(), p.fleet.freeze)
	if st != nil {
		t := st.Totals
		fmt.Fprintf(&b, "sluice        %d connections   %d slow (allowed %d)   %d paused\n", t.Connections, t.Slow, t.AllowedSlow, t.Paused)
		fmt.Fprintf(&b, "              queued %s", humanBytes(t.QueuedBytes))
		if t.Ceiling > 0 {
			fmt.Fprintf(&b, " (%.1f%% of the %s ceiling)", 100*t.Share, humanBytes(t.Ceiling))
		}
		fmt.Fprintf(&b, "   dropped %s messages\n", thousands(t.Dropped))
		fmt.Fprintf(&b, "              evictions %s   throttled %d\n", evictionLine(t, " "), t.Throttled)
	} else {
		fmt.Fprintf(&b, "sluice        status unavailable: %v\n", stErr)
	}
	fmt.Fprintf(&b, "backend       queued %s   largest client backlog %s\n", humanBytes(bq), humanBytes(bmax))
	if p.flood != nil {
		fmt.Fprintf(&b, "flooder       %s messages reached the backend in the last second (%s)\n", thousands(uint64(flood)), clientLimit(d.cfg))
	}
	if lat.Count() > 0 {
		fmt.Fprintf(&b, "fast clients  latency p50 %s   p99 %s   max %s (last second)\n",
			ms(lat.Quantile(0.5)), ms(lat.Quantile(0.99)), ms(lat.Max()))
	} else {
		b.WriteString("fast clients  no messages in the last second\n")
	}
	fmt.Fprintf(&b, "              %s messages delivered   %s gaps\n\nCtrl-C stops early and prints the summary.\n", thousands(fastMsgs), thousands(fastGaps))
	io.WriteString(d.out, b.String())
}

// evictionLine renders "3 (slow 2, pong_timeout 1)" or with sep "=",
// "3(slow=2,pong_timeout=1)".
func evictionLine(t admin.Totals, sep string) string {
	if t.Evictions == nil {
		return "?"
	}
	if *t.Evictions == 0 {
		return "0"
	}
	reasons := slices.Sorted(maps.Keys(t.EvictionsByReason))
	var parts []string
	for _, r := range reasons {
		if n := t.EvictionsByReason[r]; n > 0 {
			parts = append(parts, r+sep+fmt.Sprint(n))
		}
	}
	if sep == "=" {
		return fmt.Sprintf("%d(%s)", *t.Evictions, strings.Join(parts, ","))
	}
	return fmt.Sprintf("%d (%s)", *t.Evictions, strings.Join(parts, ", "))
}

// summary prints the two phases side by side, then what happened through
// sluice and what it means.
func (d *demo) summary() {
	o, w := d.opts, d.out
	fmt.Fprintf(w, "\n--- summary: %d clients (%d slow), %d messages/s of %d bytes", o.clients, o.nSlow(), o.rate, o.size)
	if o.flood != 0 {
		fmt.Fprintf(w, ", a flooder at %s", o.flood.describe())
	}
	fmt.Fprintln(w, " ---")
	d.comparison()
	if d.via == nil {
		return
	}
	p, f := d.via, d.via.fleet
	var fast, slow outcomeCounts
	var slowMsgs, slowGaps uint64
	var slowMaxLat time.Duration
	for _, r := range f.results {
		if r.slow {
			slow.add(r.outcome)
			slowMsgs += r.received
			slowGaps += r.gaps
			slowMaxLat = max(slowMaxLat, r.maxLatency)
		} else {
			fast.add(r.outcome)
		}
	}
	var t admin.Totals
	if p.lastStatus != nil {
		t = p.lastStatus.Totals
	}
	fmt.Fprintf(w, "\nthrough sluice, policy %s, %s:\n", o.policy, p.ran.Round(100*time.Millisecond))
	fmt.Fprintf(w, "fast clients: %d received %s messages, %s gaps; latency p50 %s, p99 %s, max %s\n",
		o.clients-o.nSlow(), thousands(f.fastMsgs.Load()), thousands(f.fastGaps.Load()),
		ms(f.runLat.Quantile(0.5)), ms(f.runLat.Quantile(0.99)), ms(f.runLat.Max()))
	fmt.Fprintf(w, "fast clients ended: %s\n", fast.String())
	if o.nSlow() > 0 {
		fmt.Fprintf(w, "slow clients: %s\n", slow.String())
		fmt.Fprintf(w, "slow clients received %s messages, %s lost (sequence gaps), up to %s late\n",
			thousands(slowMsgs), thousands(slowGaps), ms(slowMaxLat))
	}
	if p.flood != nil {
		fmt.Fprintln(w, d.floodLine(p))
	}
	fmt.Fprintf(w, "sluice: peak queued %s", humanBytes(p.peakQueued))
	if t.Ceiling > 0 {
		fmt.Fprintf(w, " (%.0f%% of the %s ceiling)", 100*float64(p.peakQueued)/float64(t.Ceiling), humanBytes(t.Ceiling))
	}
	fmt.Fprintf(w, "; evictions %s; dropped %s messages\n", evictionLine(t, " "), thousands(t.Dropped))
	if o.logPath != "" {
		fmt.Fprintf(w, "sluice's log: %s\n", o.logPath)
	}
	fmt.Fprintln(w)
	if s := d.explainDirect(); s != "" {
		fmt.Fprintln(w, wrap(s, 78))
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w, wrap(d.explain(slowGaps, slowMaxLat)+d.explainGuards(t, slow), 78))
	fmt.Fprintln(w)
	var others []string
	for _, p := range []config.Policy{config.PolicyEvict, config.PolicyDrop, config.PolicyPause} {
		if p != o.policy {
			others = append(others, "go run . demo -policy "+string(p))
		}
	}
	fmt.Fprintf(w, "Try the others:  %s\n", strings.Join(others, "   "))
	if o.slow < 0.3 {
		fmt.Fprintln(w, "More slow clients bring in the global guards:  go run . demo -slow 0.4")
	}
}

// comparison prints the phases that ran as columns of one table: what the
// backend held, the flooder's rate at the backend and
// what the fast clients saw. The demo's Go heap is not in it: sluice and
// the clients share the process with the backend, so it would not say
// whose memory grew; the live view of the first phase shows it.
func (d *demo) comparison() {
	var cols []*phase
	var heads []string
	if d.direct != nil {
		cols, heads = append(cols, d.direct), append(heads, "without sluice")
	}
	if d.via != nil {
		cols, heads = append(cols, d.via), append(heads, "through sluice")
	}
	if len(cols) == 0 {
		return
	}
	var b strings.Builder
	row := func(label string, cell func(p *phase) string) {
		line := fmt.Sprintf("%-27s", label)
		for _, p := range cols {
			line += fmt.Sprintf("  %-26s", cell(p))
		}
		b.WriteString(strings.TrimRight(line, " ") + "\n")
	}
	row("", func(p *phase) string { return heads[slices.Index(cols, p)] })
	row("backend queued at the end", func(p *phase) string {
		s := humanBytes(p.end.QueuedBytes)
		if g := p.growth.perSecond(); g >= 1024 {
			s += ", +" + humanBytes(int64(g)) + "/s"
		} else {
			s += ", flat"
		}
		return s
	})
	row("backend, one client's peak", func(p *phase) string { return humanBytes(p.end.PeakBacklogBytes) })
	if d.opts.flood != 0 {
		row("flooder at the backend", func(p *phase) string {
			s := thousands(uint64(math.Round(p.floodAtBackend()))) + " messages/s"
			if p.viaSluice && p.peakThrottled > 0 {
				s += " (throttled)"
			}
			return s
		})
	}
	row("fast clients: p99, gaps", func(p *phase) string {
		return ms(p.fleet.runLat.Quantile(0.99)) + ", " + thousands(p.fleet.fastGaps.Load())
	})
	fmt.Fprint(d.out, b.String())
}

// floodLine is what the flooder did through sluice: "flooder: sent 2,000
// messages/s, reached the backend at 52/s (limit 50/s, throttled); the
// other 200 clients unaffected (0 gaps, p99 14 ms)".
func (d *demo) floodLine(p *phase) string {
	fl, cfg := p.flood, d.cfg
	s := fmt.Sprintf("flooder: sent %s messages/s, reached the backend at %s/s",
		thousands(uint64(math.Round(fl.sentRate()))), thousands(uint64(math.Round(p.floodAtBackend()))))
	switch {
	case cfg.ClientMaxMessagesPerSecond == 0:
		s += " (no limit: SLUICE_CLIENT_MAX_MESSAGES_PER_SECOND=0)"
	case cfg.ClientRatePolicy == config.RateClose:
		s += fmt.Sprintf(" (limit %d/s); %s", cfg.ClientMaxMessagesPerSecond, fl.outcome)
	default:
		s += fmt.Sprintf(" (limit %d/s, throttled)", cfg.ClientMaxMessagesPerSecond)
	}
	if gaps := p.fleet.fastGaps.Load(); gaps == 0 {
		s += fmt.Sprintf("; other clients unaffected (0 gaps, p99 %s)", ms(p.fleet.runLat.Quantile(0.99)))
	} else {
		s += fmt.Sprintf("; fast clients saw %s gaps", thousands(gaps))
	}
	return s
}

// explainDirect says what went wrong without sluice, if that phase ran.
func (d *demo) explainDirect() string {
	p := d.direct
	if p == nil {
		return ""
	}
	var s string
	if g := p.growth.perSecond(); g >= 1024 && d.opts.nSlow() > 0 {
		s = fmt.Sprintf("Without sluice, the backend queued for its %d frozen clients without bound: %s after %s, "+
			"growing %s/s (%s an hour, until the OOM killer ends it).",
			d.opts.nSlow(), humanBytes(p.end.QueuedBytes), p.ran.Round(time.Second), humanBytes(int64(g)), humanBytes(int64(g*3600)))
	}
	if p.flood != nil {
		s += fmt.Sprintf(" The flooder's %s messages/s all reached it.", thousands(uint64(math.Round(p.floodAtBackend()))))
	}
	if s == "" {
		return ""
	}
	return strings.TrimSpace(s)
}

// explainGuards adds what the global guards did, if anything, and why
// some slow clients found no close frame.
func (d *demo) explainGuards(t admin.Totals, slow outcomeCounts) string {
	var s string
	if n := t.EvictionsByReason["slow_ratio"]; n > 0 {
		s += fmt.Sprintf(" The slow-ratio guard evicted %d: more than %g of all clients (SLUICE_SLOW_CLIENT_MAX_RATIO, "+
			"and at least %d) had taken nothing for %s at once (SLUICE_SLOW_CLIENT_AGE), and the longest stalled went first, "+
			"before their own queue was full.",
			n, d.cfg.SlowClientMaxRatio, limiter.MinAllowedSlow, d.cfg.SlowClientAge)
	}
	if n := t.EvictionsByReason["global_ceiling"]; n > 0 {
		s += fmt.Sprintf(" The global guard evicted %d: all queues together passed SLUICE_GLOBAL_QUEUE_MAX_BYTES (%s), "+
			"and the largest went first.", n, humanBytes(t.Ceiling))
	}
	if n := slow[outcome1006]; n > 0 {
		s += fmt.Sprintf(" %d slow clients read again more than SLUICE_CLOSE_TIMEOUT (%s) after their eviction and "+
			"found the connection cut without a close frame (1006): a close frame cannot pass a window the client keeps shut.",
			n, d.cfg.CloseTimeout)
	}
	return s
}

// explain says in plain words what the policy did in this run.
func (d *demo) explain(slowGaps uint64, slowMaxLat time.Duration) string {
	cfg := d.cfg
	p := d.via
	fastGaps := p.fleet.fastGaps.Load()
	fastLine := fmt.Sprintf("Fast clients were not held back (p99 %s, %s gaps).", ms(p.fleet.runLat.Quantile(0.99)), thousands(fastGaps))
	if d.opts.nSlow() == 0 {
		return "No client was slow (-slow 0), so the policy had nothing to do. " + fastLine + " Run with -slow 0.05 or more to see it act."
	}
	switch d.opts.policy {
	case config.PolicyDrop:
		return fmt.Sprintf("drop: whenever a slow client's queue in sluice reached its high-water mark "+
			"(SLUICE_QUEUE_MAX_MESSAGES=%d), sluice discarded its oldest whole messages and kept the newest %d "+
			"(SLUICE_DROP_KEEP_NEWEST). Slow clients stayed connected and, when they read again, found %s messages "+
			"missing. sluice's memory stayed bounded (peak %s) and the backend never noticed (no client's backlog there "+
			"passed %s). %s Right for feeds where only the latest state matters (prices, positions, presence); wrong "+
			"where every message counts.",
			cfg.QueueMaxMessages, cfg.DropKeepNewest, thousands(slowGaps), humanBytes(p.peakQueued),
			humanBytes(p.end.PeakBacklogBytes), fastLine)
	case config.PolicyPause:
		pauseMax := "no limit (SLUICE_PAUSE_MAX=0)"
		if cfg.PauseMax > 0 {
			pauseMax = "SLUICE_PAUSE_MAX=" + cfg.PauseMax.String()
		}
		return fmt.Sprintf("pause: when a slow client's queue in sluice reached %d messages, sluice stopped reading "+
			"that client's upstream connection, and TCP backpressure carried the problem to the backend. Nothing was lost "+
			"(%s gaps; slow clients got their messages up to %s late), but the backlog moved into the backend: its "+
			"queues peaked at %s (%s for one client), and in this naive backend nothing bounds them. %s Pause fits "+
			"backends that bound or coalesce their own per-connection backlog; pauses here had %s.",
			cfg.QueueMaxMessages, thousands(slowGaps), ms(slowMaxLat), humanBytes(p.end.PeakQueuedBytes),
			humanBytes(p.end.PeakBacklogBytes), fastLine, pauseMax)
	default:
		return fmt.Sprintf("evict: a slow client's queue in sluice filled to its high-water mark "+
			"(SLUICE_QUEUE_MAX_MESSAGES=%d) a few seconds after it stopped reading, and sluice closed it with "+
			"1013 Try Again Later, which tells a client to back off and reconnect. A frozen client reads that close "+
			"only if it reads again within SLUICE_CLOSE_TIMEOUT (%s); after that sluice cuts the connection. "+
			"sluice's memory stayed bounded (peak %s) and the backend never noticed (no client's backlog there passed %s). "+
			"%s The price: slow clients lose their connection and must resubscribe.",
			cfg.QueueMaxMessages, cfg.CloseTimeout, humanBytes(p.peakQueued), humanBytes(p.end.PeakBacklogBytes), fastLine)
	}
}
