package demo

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"sluice/admin"
	"sluice/config"
	"sluice/internal/latency"
)

// draw prints one refresh: a screen on a terminal, else one line.
func (d *demo) draw(elapsed time.Duration, st *admin.Status, stErr error) {
	o := d.opts
	lat := d.fleet.lastLat.Swap(new(latency.Histogram))
	bq, bmax := d.backend.Stats().QueuedBytes, d.backend.LargestBacklog()
	fastMsgs, fastGaps := d.fleet.fastMsgs.Load(), d.fleet.fastGaps.Load()
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
			fmt.Fprintf(&b, " evictions=%s dropped=%d", evictionLine(t, "="), t.Dropped)
		} else {
			fmt.Fprintf(&b, " status=unavailable(%v)", stErr)
		}
		fmt.Fprintf(&b, " backend_queued=%s backend_max=%s", compactBytes(bq), compactBytes(bmax))
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
	fmt.Fprintf(&b, "sluice demo   policy %s   %s of %s\n\n", o.policy, sec, o.duration)
	fmt.Fprintf(&b, "clients       %d fast, %d slow (they stop reading after their first message, for %s)\n",
		o.clients-o.nSlow(), o.nSlow(), d.fleet.freeze)
	if st != nil {
		t := st.Totals
		fmt.Fprintf(&b, "sluice        %d connections   %d slow (allowed %d)   %d paused\n", t.Connections, t.Slow, t.AllowedSlow, t.Paused)
		fmt.Fprintf(&b, "              queued %s", humanBytes(t.QueuedBytes))
		if t.Ceiling > 0 {
			fmt.Fprintf(&b, " (%.1f%% of the %s ceiling)", 100*t.Share, humanBytes(t.Ceiling))
		}
		fmt.Fprintf(&b, "   dropped %s messages\n", thousands(t.Dropped))
		fmt.Fprintf(&b, "              evictions %s\n", evictionLine(t, " "))
	} else {
		fmt.Fprintf(&b, "sluice        status unavailable: %v\n", stErr)
	}
	fmt.Fprintf(&b, "backend       queued %s   largest client backlog %s\n", humanBytes(bq), humanBytes(bmax))
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

// summary prints what happened and what it means.
func (d *demo) summary() {
	o, f := d.opts, d.fleet
	w := d.out
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
	if d.lastStatus != nil {
		t = d.lastStatus.Totals
	}
	fmt.Fprintf(w, "\n--- summary: policy %s, %s, %d clients (%d slow), %d messages/s of %d bytes ---\n",
		o.policy, d.loadDuration.Round(100*time.Millisecond), o.clients, o.nSlow(), o.rate, o.size)
	fmt.Fprintf(w, "fast clients: %d received %s messages, %s gaps; latency p50 %s, p99 %s, max %s\n",
		o.clients-o.nSlow(), thousands(f.fastMsgs.Load()), thousands(f.fastGaps.Load()),
		ms(f.runLat.Quantile(0.5)), ms(f.runLat.Quantile(0.99)), ms(f.runLat.Max()))
	fmt.Fprintf(w, "fast clients ended: %s\n", fast.String())
	if o.nSlow() > 0 {
		fmt.Fprintf(w, "slow clients: %s\n", slow.String())
		fmt.Fprintf(w, "slow clients received %s messages, %s lost (sequence gaps), up to %s late\n",
			thousands(slowMsgs), thousands(slowGaps), ms(slowMaxLat))
	}
	fmt.Fprintf(w, "sluice: peak queued %s", humanBytes(d.peakQueued))
	if t.Ceiling > 0 {
		fmt.Fprintf(w, " (%.0f%% of the %s ceiling)", 100*float64(d.peakQueued)/float64(t.Ceiling), humanBytes(t.Ceiling))
	}
	fmt.Fprintf(w, "; evictions %s; dropped %s messages\n", evictionLine(t, " "), thousands(t.Dropped))
	fmt.Fprintf(w, "backend: peak queued %s (all clients), largest client backlog %s\n",
		humanBytes(d.backend.Stats().PeakQueuedBytes), humanBytes(d.backend.Stats().PeakBacklogBytes))
	if o.logPath != "" {
		fmt.Fprintf(w, "sluice's log: %s\n", o.logPath)
	}
	fmt.Fprintln(w)
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

// explainGuards adds what the global guards did, if anything, and why
// some slow clients found no close frame.
func (d *demo) explainGuards(t admin.Totals, slow outcomeCounts) string {
	var s string
	if n := t.EvictionsByReason["slow_ratio"]; n > 0 {
		s += fmt.Sprintf(" The slow-ratio guard evicted %d: more than %g of all clients (SLUICE_SLOW_CLIENT_MAX_RATIO) "+
			"were %d or more messages behind at once, and the slowest went first, before their own queue was full.",
			n, d.cfg.SlowClientMaxRatio, d.cfg.SlowClientDepth)
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
	fastGaps := d.fleet.fastGaps.Load()
	fastLine := fmt.Sprintf("Fast clients were not held back (p99 %s, %s gaps).", ms(d.fleet.runLat.Quantile(0.99)), thousands(fastGaps))
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
			cfg.QueueMaxMessages, cfg.DropKeepNewest, thousands(slowGaps), humanBytes(d.peakQueued),
			humanBytes(d.backend.Stats().PeakBacklogBytes), fastLine)
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
			cfg.QueueMaxMessages, thousands(slowGaps), ms(slowMaxLat), humanBytes(d.backend.Stats().PeakQueuedBytes),
			humanBytes(d.backend.Stats().PeakBacklogBytes), fastLine, pauseMax)
	default:
		return fmt.Sprintf("evict: a slow client's queue in sluice filled to its high-water mark "+
			"(SLUICE_QUEUE_MAX_MESSAGES=%d) a few seconds after it stopped reading, and sluice closed it with "+
			"1013 Try Again Later, which tells a client to back off and reconnect. A frozen client reads that close "+
			"only if it reads again within SLUICE_CLOSE_TIMEOUT (%s); after that sluice cuts the connection. "+
			"sluice's memory stayed bounded (peak %s) and the backend never noticed (no client's backlog there passed %s). "+
			"%s The price: slow clients lose their connection and must resubscribe.",
			cfg.QueueMaxMessages, cfg.CloseTimeout, humanBytes(d.peakQueued), humanBytes(d.backend.Stats().PeakBacklogBytes), fastLine)
	}
}
