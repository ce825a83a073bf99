package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"math"
	"math/bits"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gobwas/ws"
	"github.com/gorilla/websocket"
	"github.com/rs/zerolog"

	"sluice/proxy"
)

// The demo puts three things on loopback: a naive broadcast backend (the
// kind of server sluice protects), sluice in front of it, and a fleet of
// fast and slow WebSocket clients. Everything it starts is bounded: the
// number of clients by -clients, the run by -duration. The demo backend's
// queues are deliberately unbounded (that is the failure sluice exists to
// prevent) and only the time bound keeps them finite. runDemo returns only
// after every goroutine it started has ended.

// A slow client takes its first message, then stops reading entirely for
// a while (a frozen tab, a phone in a tunnel), then comes back and reads
// to the end. It must come back to learn anything: a close frame cannot
// pass a TCP window the client keeps shut, so sluice's 1013 reaches a
// frozen client only if it reads again within SLUICE_CLOSE_TIMEOUT of its
// eviction. The freeze therefore lasts as long as sluice needs to fill the
// client's queue at the chosen -rate and -size, plus slowGrace.
//
// It freezes right after its first message rather than after reading
// normally for a while: on loopback each message read grows sluice's TCP
// congestion window, and Linux sizes the send buffer from it (two seconds
// at 50 messages/s make it ~800 KiB), which would hide the stall from
// sluice's queue for a quarter of a minute.
const (
	slowGrace     = 2500 * time.Millisecond
	minSlowFreeze = 3 * time.Second
	// kernelBuffered estimates what the kernel holds for a client that
	// froze early: sluice's send buffer plus the client's receive buffer.
	kernelBuffered = 128 << 10
)

// slowFreeze is how long slow clients stop reading: until sluice's queue
// for them is full, plus slowGrace (at most half of SLUICE_CLOSE_TIMEOUT,
// so a client evicted on time still reads its close frame).
func slowFreeze(o demoOptions, cfg Config) time.Duration {
	frame := int64(o.size + ws.HeaderSize(ws.Header{Length: int64(o.size)}))
	queue := min(int64(cfg.QueueMaxMessages)*frame, int64(cfg.QueueMaxBytes))
	fill := time.Duration(float64(kernelBuffered+queue) / float64(int64(o.rate)*frame) * float64(time.Second))
	return max(fill+min(slowGrace, cfg.CloseTimeout/2), minSlowFreeze).Round(100 * time.Millisecond)
}

// Socket sizes that make loopback behave more like a real network path. On
// loopback the MSS is 64 KiB and Linux sizes a sender's buffer from it, so
// a socket whose peer stopped reading soaks up megabytes in the kernel
// before any queue in user space sees a thing. An Ethernet-sized MSS, a
// small receive buffer on slow clients and a small send buffer on the demo
// backend keep that to what a client on the internet would see.
const (
	ethernetMSS    = 1460
	slowClientRcv  = 4 << 10  // SO_RCVBUF of a slow client
	backendSendBuf = 16 << 10 // SO_SNDBUF of the demo backend's sockets
)

// demoDefaults are the SLUICE_* settings the demo runs with unless the
// environment sets them: small enough that each policy shows within
// seconds at the default -rate. Keepalive keeps sluice's defaults (25 s
// pings, 10 s pong timeout): a shorter pong timeout than slowFreeze would
// close every slow client for missing pongs and hide what the policy does.
var demoDefaults = map[string]string{
	envPrefix + "QUEUE_MAX_MESSAGES":     "100",  // 2 s of broadcast at -rate 50
	envPrefix + "SLOW_CLIENT_MAX_RATIO":  "0.25", // above -slow 0.05, so the policy acts, not the guard
	envPrefix + "GLOBAL_QUEUE_MAX_BYTES": "4MiB",
	envPrefix + "UPSTREAM_READ_BUFFER":   "4KiB", // pause reaches the backend within a second
	envPrefix + "SHUTDOWN_TIMEOUT":       "5s",
	envPrefix + "LOG_LEVEL":              "warn",
}

// demoOwned are settings the demo decides itself; the environment's values
// are ignored with a note.
var demoOwned = []string{envPrefix + "UPSTREAM_URL", envPrefix + "LISTEN_ADDR", envPrefix + "ADMIN_ADDR"}

// demoOptions are the command-line flags of `sluice demo`.
type demoOptions struct {
	policy    Policy
	policySet bool // -policy was given: it beats SLUICE_POLICY
	slow      float64
	clients   int
	duration  time.Duration
	rate      int
	size      int
	admin     string
	plain     bool
	logPath   string
}

// maxBroadcast bounds what the backend sends to all clients together, in
// bytes a second, so that no combination of flags outruns the machine.
const maxBroadcast = 1 << 30

// nSlow is the number of slow clients.
func (o demoOptions) nSlow() int { return int(math.Round(float64(o.clients) * o.slow)) }

func parseDemoFlags(args []string, stderr io.Writer) (demoOptions, error) {
	var o demoOptions
	policy := string(PolicyEvict)
	fs := flag.NewFlagSet("sluice demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&policy, "policy", policy, "what sluice does with a slow client's full queue: evict, drop or pause")
	fs.Float64Var(&o.slow, "slow", 0.05, "share of the clients that are slow, from 0 to 1")
	fs.IntVar(&o.clients, "clients", 200, "number of WebSocket clients, from 1 to 10000")
	fs.DurationVar(&o.duration, "duration", 30*time.Second, "how long to run, from 1s to 1h (Ctrl-C stops early)")
	fs.IntVar(&o.rate, "rate", 50, "broadcast messages per second, from 1 to 10000")
	fs.IntVar(&o.size, "size", 1024, "bytes per message, from 16 to 1048576")
	fs.StringVar(&o.admin, "admin", "127.0.0.1:9090", "address of the status page; if busy, a free port is used")
	fs.BoolVar(&o.plain, "plain", false, "print one line per second instead of a refreshing screen")
	fs.StringVar(&o.logPath, "log", "", "write sluice's own log to this file (default: discard it)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: sluice demo [flags]\n\nRuns a naive broadcast backend, sluice in front of it and a fleet of fast and slow\nclients on loopback, and shows what the chosen policy does. Flags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("demo: unexpected argument %q (flags only; see sluice demo -h)", fs.Arg(0))
	}
	fs.Visit(func(f *flag.Flag) { o.policySet = o.policySet || f.Name == "policy" })

	var problems []string
	bad := func(name string, value any, want string) {
		problems = append(problems, fmt.Sprintf("-%s=%v: want %s", name, value, want))
	}
	if err := o.policy.UnmarshalText([]byte(policy)); err != nil {
		bad("policy", policy, "evict, drop or pause")
	}
	if !(o.slow >= 0 && o.slow <= 1) {
		bad("slow", o.slow, "a share from 0 to 1, such as 0.05")
	}
	if o.clients < 1 || o.clients > 10000 {
		bad("clients", o.clients, "a whole number from 1 to 10000")
	}
	if o.duration < time.Second || o.duration > time.Hour {
		bad("duration", o.duration, "a duration from 1s to 1h, such as 30s")
	}
	if o.rate < 1 || o.rate > 10000 {
		bad("rate", o.rate, "messages per second from 1 to 10000")
	}
	if o.size < 16 || o.size > 1<<20 {
		bad("size", o.size, "bytes from 16 (timestamp and sequence number) to 1048576")
	}
	if total := int64(o.rate) * int64(o.size) * int64(o.clients); len(problems) == 0 && total > maxBroadcast {
		problems = append(problems, fmt.Sprintf("-rate=%d × -size=%d × -clients=%d is %s/s: want at most %s/s in total",
			o.rate, o.size, o.clients, humanBytes(total), humanBytes(maxBroadcast)))
	}
	if !validHostPort(o.admin) {
		bad("admin", o.admin, "a host:port such as 127.0.0.1:9090, or 127.0.0.1:0 for any free port")
	}
	if len(problems) > 0 {
		return o, errors.New("demo: " + strings.Join(problems, "\n      "))
	}
	return o, nil
}

// demoConfig is sluice's configuration for the demo: demoDefaults, then
// the user's SLUICE_* environment, then what the demo decides itself.
func demoConfig(environ map[string]string, o demoOptions, notes io.Writer) (Config, error) {
	env := maps.Clone(demoDefaults)
	maps.Copy(env, environ)
	for _, k := range demoOwned {
		if v, ok := env[k]; ok {
			if _, own := environ[k]; own && v != "" {
				fmt.Fprintf(notes, "demo: ignoring %s: the demo chooses it\n", k)
			}
			delete(env, k)
		}
	}
	if o.policySet {
		env[envPrefix+"POLICY"] = string(o.policy)
	}
	cfg, err := LoadConfig(env, AllowNoUpstream())
	if err != nil {
		return Config{}, fmt.Errorf("demo: %w", err)
	}
	cfg.ListenAddr = "127.0.0.1:0"
	cfg.AdminAddr = o.admin
	return cfg, nil
}

// runDemo is `sluice demo`: see the usage text in parseDemoFlags.
func runDemo(ctx context.Context, args []string, environ map[string]string, stdout, stderr io.Writer) error {
	o, err := parseDemoFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	cfg, err := demoConfig(environ, o, stderr)
	if err != nil {
		return err
	}
	o.policy = cfg.Policy
	logw := io.Discard
	if o.logPath != "" {
		f, err := os.Create(o.logPath)
		if err != nil {
			return fmt.Errorf("demo: -log: %w", err)
		}
		defer f.Close()
		logw = f
	}
	log := newLogger(cfg, logw)
	for _, w := range cfg.Warnings() {
		log.Warn().Msg(w)
	}
	d := &demo{opts: o, cfg: cfg, log: log, out: stdout, tty: isTerminal(stdout) && !o.plain}
	return d.run(ctx)
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// demo is one run of the demo.
type demo struct {
	opts demoOptions
	cfg  Config
	log  zerolog.Logger
	out  io.Writer
	tty  bool // refresh the screen in place

	backend *demoBackend
	fleet   *demoFleet
	srv     *proxy.Server
	// Owned by run's goroutine.
	statusURL    string
	client       *http.Client // reads /status.json, like the page does
	peakQueued   int64        // sluice's queued bytes, sampled every 100 ms
	lastStatus   *statusJSON
	began        time.Time
	loadDuration time.Duration
}

// run starts everything, shows the screen until the duration ends or ctx
// is cancelled, stops everything in order and prints the summary.
func (d *demo) run(ctx context.Context) error {
	o := d.opts
	var err error
	d.backend, err = startDemoBackend(o.rate, o.size)
	if err != nil {
		return err
	}
	defer d.backend.close() // idempotent; the normal path closes it earlier

	d.cfg.UpstreamURL = &url.URL{Scheme: "ws", Host: d.backend.addr(), Path: "/feed"}
	// sluice gets its own context: Ctrl-C ends the load phase, and the
	// teardown below then drains sluice at the right moment.
	sluiceCtx, stopSluice := context.WithCancel(context.WithoutCancel(ctx))
	defer stopSluice()
	wsAddr, adminAddr, serveDone, err := d.startSluice(sluiceCtx)
	if err != nil {
		return err
	}
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	d.client = &http.Client{Transport: tr}
	d.statusURL = "http://" + adminAddr + "/status.json"

	fmt.Fprintf(d.out, "sluice demo: policy %s, %d clients (%d slow), %d messages/s of %d bytes, for %s\n",
		o.policy, o.clients, o.nSlow(), o.rate, o.size, o.duration)
	fmt.Fprintf(d.out, "status page: http://%s/status\n", adminAddr)

	loadCtx, endLoad := context.WithTimeout(ctx, o.duration)
	defer endLoad()
	d.began = time.Now()
	d.fleet = newDemoFleet("ws://"+wsAddr+"/feed", o, slowFreeze(o, d.cfg))
	d.fleet.start(loadCtx)
	d.backend.startBroadcast()

	d.watch(loadCtx)
	d.loadDuration = time.Since(d.began)

	// Teardown, in the order that lets every party see a clean end.
	d.backend.stopBroadcast()
	if st, err := d.fetchStatus(5 * time.Second); err == nil {
		d.lastStatus = st
	}
	// Frozen clients read again and learn how their connection ended;
	// every client gets a deadline so none can wait forever.
	d.fleet.wake(time.Now().Add(d.cfg.ShutdownTimeout + 5*time.Second))
	stopSluice() // drain: 1001 to every client after its queued data
	serveErr := <-serveDone
	d.fleet.wait()
	d.backend.close()
	tr.CloseIdleConnections()
	if serveErr != nil {
		return fmt.Errorf("demo: sluice: %w", serveErr)
	}
	d.summary()
	return nil
}

// startSluice runs serve in a goroutine and waits until it listens. If
// the admin address is taken it falls back to any free port.
func (d *demo) startSluice(ctx context.Context) (wsAddr, adminAddr string, done <-chan error, err error) {
	if ln, err := net.Listen("tcp", d.cfg.AdminAddr); err != nil {
		if !errors.Is(err, syscall.EADDRINUSE) {
			return "", "", nil, fmt.Errorf("demo: -admin=%s: %w", d.cfg.AdminAddr, err)
		}
		fmt.Fprintf(d.out, "demo: %s is busy; the status page uses a free port instead\n", d.cfg.AdminAddr)
		d.cfg.AdminAddr = "127.0.0.1:0"
	} else {
		ln.Close()
	}
	type listening struct {
		ws, admin string
		srv       *proxy.Server
	}
	ready := make(chan listening, 1)
	serveDone := make(chan error, 1)
	go func() {
		serveDone <- serve(ctx, d.cfg, d.log, func(wsAddr, adminAddr string, srv *proxy.Server) {
			ready <- listening{wsAddr, adminAddr, srv}
		})
	}()
	select {
	case l := <-ready:
		d.srv = l.srv
		return l.ws, l.admin, serveDone, nil
	case err := <-serveDone:
		return "", "", nil, fmt.Errorf("demo: starting sluice: %w", err)
	}
}

// fetchStatus reads /status.json: the screen shows what the page shows.
func (d *demo) fetchStatus(timeout time.Duration) (*statusJSON, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, d.statusURL, nil)
	if err != nil {
		return nil, err
	}
	resp, err := d.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("status page: %s", resp.Status)
	}
	var s statusJSON
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		return nil, err
	}
	return &s, nil
}

// watch samples sluice's queued bytes every 100 ms for the peak and
// redraws the screen every second until ctx ends.
func (d *demo) watch(ctx context.Context) {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	next := d.began.Add(time.Second)
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			d.peakQueued = max(d.peakQueued, d.srv.Budget().Stats().QueuedBytes)
			if now.Before(next) {
				continue
			}
			next = next.Add(time.Second)
			st, err := d.fetchStatus(time.Second)
			if st != nil {
				d.lastStatus = st
			}
			d.draw(now.Sub(d.began), st, err)
		}
	}
}

// draw prints one refresh: a screen on a terminal, else one line.
func (d *demo) draw(elapsed time.Duration, st *statusJSON, stErr error) {
	o := d.opts
	lat := d.fleet.lastLat.Swap(new(latencyHist))
	bq, bmax := d.backend.stats()
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
		if lat.count() > 0 {
			fmt.Fprintf(&b, " p50=%s p99=%s max=%s", ms(lat.quantile(0.5)), ms(lat.quantile(0.99)), ms(lat.maxLatency()))
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
	if lat.count() > 0 {
		fmt.Fprintf(&b, "fast clients  latency p50 %s   p99 %s   max %s (last second)\n",
			ms(lat.quantile(0.5)), ms(lat.quantile(0.99)), ms(lat.maxLatency()))
	} else {
		b.WriteString("fast clients  no messages in the last second\n")
	}
	fmt.Fprintf(&b, "              %s messages delivered   %s gaps\n\nCtrl-C stops early and prints the summary.\n", thousands(fastMsgs), thousands(fastGaps))
	io.WriteString(d.out, b.String())
}

// evictionLine renders "3 (slow 2, pong_timeout 1)" or with sep "=",
// "3(slow=2,pong_timeout=1)".
func evictionLine(t statusTotals, sep string) string {
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
	var t statusTotals
	if d.lastStatus != nil {
		t = d.lastStatus.Totals
	}
	fmt.Fprintf(w, "\n--- summary: policy %s, %s, %d clients (%d slow), %d messages/s of %d bytes ---\n",
		o.policy, d.loadDuration.Round(100*time.Millisecond), o.clients, o.nSlow(), o.rate, o.size)
	fmt.Fprintf(w, "fast clients: %d received %s messages, %s gaps; latency p50 %s, p99 %s, max %s\n",
		o.clients-o.nSlow(), thousands(f.fastMsgs.Load()), thousands(f.fastGaps.Load()),
		ms(f.runLat.quantile(0.5)), ms(f.runLat.quantile(0.99)), ms(f.runLat.maxLatency()))
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
		humanBytes(d.backend.peak.Load()), humanBytes(d.backend.peakBacklog.Load()))
	if o.logPath != "" {
		fmt.Fprintf(w, "sluice's log: %s\n", o.logPath)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, wrap(d.explain(slowGaps, slowMaxLat)+d.explainGuards(t, slow), 78))
	fmt.Fprintln(w)
	var others []string
	for _, p := range []Policy{PolicyEvict, PolicyDrop, PolicyPause} {
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
func (d *demo) explainGuards(t statusTotals, slow outcomeCounts) string {
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
	fastLine := fmt.Sprintf("Fast clients were not held back (p99 %s, %s gaps).", ms(d.fleet.runLat.quantile(0.99)), thousands(fastGaps))
	if d.opts.nSlow() == 0 {
		return "No client was slow (-slow 0), so the policy had nothing to do. " + fastLine + " Run with -slow 0.05 or more to see it act."
	}
	switch d.opts.policy {
	case PolicyDrop:
		return fmt.Sprintf("drop: whenever a slow client's queue in sluice reached its high-water mark "+
			"(SLUICE_QUEUE_MAX_MESSAGES=%d), sluice discarded its oldest whole messages and kept the newest %d "+
			"(SLUICE_DROP_KEEP_NEWEST). Slow clients stayed connected and, when they read again, found %s messages "+
			"missing. sluice's memory stayed bounded (peak %s) and the backend never noticed (no client's backlog there "+
			"passed %s). %s Right for feeds where only the latest state matters (prices, positions, presence); wrong "+
			"where every message counts.",
			cfg.QueueMaxMessages, cfg.DropKeepNewest, thousands(slowGaps), humanBytes(d.peakQueued),
			humanBytes(d.backend.peakBacklog.Load()), fastLine)
	case PolicyPause:
		pauseMax := "no limit (SLUICE_PAUSE_MAX=0)"
		if cfg.PauseMax > 0 {
			pauseMax = "SLUICE_PAUSE_MAX=" + cfg.PauseMax.String()
		}
		return fmt.Sprintf("pause: when a slow client's queue in sluice reached %d messages, sluice stopped reading "+
			"that client's upstream connection, and TCP backpressure carried the problem to the backend. Nothing was lost "+
			"(%s gaps; slow clients got their messages up to %s late), but the backlog moved into the backend: its "+
			"queues peaked at %s (%s for one client), and in this naive backend nothing bounds them. %s Pause fits "+
			"backends that bound or coalesce their own per-connection backlog; pauses here had %s.",
			cfg.QueueMaxMessages, thousands(slowGaps), ms(slowMaxLat), humanBytes(d.backend.peak.Load()),
			humanBytes(d.backend.peakBacklog.Load()), fastLine, pauseMax)
	default:
		return fmt.Sprintf("evict: a slow client's queue in sluice filled to its high-water mark "+
			"(SLUICE_QUEUE_MAX_MESSAGES=%d) a few seconds after it stopped reading, and sluice closed it with "+
			"1013 Try Again Later, which tells a client to back off and reconnect. A frozen client reads that close "+
			"only if it reads again within SLUICE_CLOSE_TIMEOUT (%s); after that sluice cuts the connection. "+
			"sluice's memory stayed bounded (peak %s) and the backend never noticed (no client's backlog there passed %s). "+
			"%s The price: slow clients lose their connection and must resubscribe.",
			cfg.QueueMaxMessages, cfg.CloseTimeout, humanBytes(d.peakQueued), humanBytes(d.backend.peakBacklog.Load()), fastLine)
	}
}

// --- the naive backend ---

// demoBackend is a broadcast server written the way many are: every
// message is appended to every connection's queue, and a writer per
// connection drains it as fast as the socket allows. Nothing bounds a
// queue, so one client that stops reading makes the backend's memory grow
// for as long as the run lasts. It uses gobwas/ws, a WebSocket library
// independent of the clients' gorilla/websocket.
type demoBackend struct {
	ln   net.Listener
	rate int
	size int

	queued      atomic.Int64 // bytes waiting in all connections' queues
	peak        atomic.Int64 // highest queued seen
	peakBacklog atomic.Int64 // highest single connection's backlog seen

	stop          chan struct{} // closed to stop the broadcaster
	stopOnce      sync.Once
	broadcastDone chan struct{}
	started       atomic.Bool

	mu     sync.Mutex
	conns  map[*backendConn]struct{} // guarded by mu
	closed bool                      // guarded by mu

	wg sync.WaitGroup // the acceptor and every connection goroutine
}

// backendConn is one connection of the demo backend.
type backendConn struct {
	b       *demoBackend
	conn    net.Conn
	backlog atomic.Int64 // bytes queued or being written
	wake    chan struct{}

	mu         sync.Mutex
	queue      [][]byte // guarded by mu; frames not yet written, unbounded on purpose
	closing    bool     // guarded by mu: the writer stops
	closeFrame []byte   // guarded by mu: written by the writer before it stops
}

func startDemoBackend(rate, size int) (*demoBackend, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		// Accepted sockets inherit both options.
		return setSockopts(c, sockopt{syscall.SOL_SOCKET, syscall.SO_SNDBUF, backendSendBuf},
			sockopt{syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, ethernetMSS})
	}}
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("demo: backend: %w", err)
	}
	b := &demoBackend{
		ln: ln, rate: rate, size: size,
		stop: make(chan struct{}), broadcastDone: make(chan struct{}),
		conns: make(map[*backendConn]struct{}),
	}
	b.wg.Add(1)
	go b.backendAcceptor()
	return b, nil
}

func (b *demoBackend) addr() string { return b.ln.Addr().String() }

func (b *demoBackend) backendAcceptor() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.wg.Add(1)
		go b.backendReader(c)
	}
}

// backendReader upgrades c, starts its writer and reads until the peer
// closes: frames from sluice are discarded, pings answered, a close echoed.
func (b *demoBackend) backendReader(c net.Conn) {
	defer b.wg.Done()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := ws.Upgrade(c); err != nil {
		c.Close()
		return
	}
	c.SetDeadline(time.Time{})
	bc := &backendConn{b: b, conn: c, wake: make(chan struct{}, 1)}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		c.Close()
		return
	}
	b.conns[bc] = struct{}{}
	b.wg.Add(1)
	b.mu.Unlock()
	go bc.backendWriter()

	br := bufio.NewReaderSize(c, 1024)
	var ctl [ws.MaxControlFramePayloadSize]byte
	for {
		h, err := ws.ReadHeader(br)
		if err != nil {
			bc.end(nil)
			return
		}
		if !h.OpCode.IsControl() {
			if _, err := io.CopyN(io.Discard, br, h.Length); err != nil {
				bc.end(nil)
				return
			}
			continue
		}
		if h.Length > int64(len(ctl)) {
			bc.end(ws.MustCompileFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(ws.StatusProtocolError, ""))))
			return
		}
		p := ctl[:h.Length]
		if _, err := io.ReadFull(br, p); err != nil {
			bc.end(nil)
			return
		}
		if h.Masked {
			ws.Cipher(p, h.Mask, 0)
		}
		switch h.OpCode {
		case ws.OpClose:
			code := ws.StatusNormalClosure
			if len(p) >= 2 {
				code = ws.StatusCode(binary.BigEndian.Uint16(p))
			}
			bc.end(ws.MustCompileFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(code, ""))))
			return
		case ws.OpPing:
			bc.enqueue(ws.MustCompileFrame(ws.NewPongFrame(p)))
		}
	}
}

// end asks the writer to write closeFrame (if any) and stop.
func (bc *backendConn) end(closeFrame []byte) {
	bc.mu.Lock()
	bc.closing = true
	bc.closeFrame = closeFrame
	bc.mu.Unlock()
	if closeFrame == nil {
		bc.conn.Close() // unblocks a writer stuck on a dead peer
	}
	bc.signal()
}

func (bc *backendConn) signal() {
	select {
	case bc.wake <- struct{}{}:
	default:
	}
}

// enqueue appends frame to the connection's queue, without any bound.
func (bc *backendConn) enqueue(frame []byte) {
	n := int64(len(frame))
	bc.mu.Lock()
	if bc.closing {
		bc.mu.Unlock()
		return
	}
	bc.queue = append(bc.queue, frame)
	bc.mu.Unlock()
	backlog := bc.backlog.Add(n)
	bc.b.queued.Add(n)
	atomicMax(&bc.b.peakBacklog, backlog)
	bc.signal()
}

// backendWriter is the only goroutine writing to the connection. Like the
// naive servers it imitates, it sets no write deadline: a client that stops
// reading blocks it, and the queue grows behind it.
func (bc *backendConn) backendWriter() {
	defer bc.b.wg.Done()
	defer bc.finish()
	for {
		bc.mu.Lock()
		for len(bc.queue) == 0 && !bc.closing {
			bc.mu.Unlock()
			<-bc.wake
			bc.mu.Lock()
		}
		if bc.closing {
			frame := bc.closeFrame
			bc.mu.Unlock()
			if frame != nil {
				bc.conn.SetWriteDeadline(time.Now().Add(time.Second))
				bc.conn.Write(frame)
			}
			return
		}
		batch := bc.queue
		bc.queue = nil
		bc.mu.Unlock()
		var n int64
		for _, f := range batch {
			n += int64(len(f))
		}
		bufs := net.Buffers(batch)
		_, err := bufs.WriteTo(bc.conn)
		bc.backlog.Add(-n)
		bc.b.queued.Add(-n)
		if err != nil {
			return
		}
	}
}

// finish closes the connection and forgets its queue.
func (bc *backendConn) finish() {
	bc.conn.Close()
	b := bc.b
	b.mu.Lock()
	delete(b.conns, bc)
	b.mu.Unlock()
	bc.mu.Lock()
	bc.closing = true
	bc.queue = nil
	bc.mu.Unlock()
	left := bc.backlog.Swap(0)
	b.queued.Add(-left)
}

func (b *demoBackend) startBroadcast() {
	b.started.Store(true)
	go b.backendBroadcaster()
}

// backendBroadcaster sends -rate messages a second to every connection. A
// message is the send time (unix nanoseconds) and a sequence number, both
// big-endian uint64, padded to -size bytes; the frame is encoded once and
// shared by every queue.
func (b *demoBackend) backendBroadcaster() {
	defer close(b.broadcastDone)
	interval := max(time.Second/time.Duration(b.rate), time.Millisecond)
	t := time.NewTicker(interval)
	defer t.Stop()
	start := time.Now()
	var sent int64
	var conns []*backendConn
	var hdr bytes.Buffer // the same for every message
	ws.WriteHeader(&hdr, ws.Header{Fin: true, OpCode: ws.OpBinary, Length: int64(b.size)})
	for {
		select {
		case <-b.stop:
			return
		case now := <-t.C:
			due := int64(now.Sub(start)) * int64(b.rate) / int64(time.Second)
			if sent >= due {
				continue
			}
			b.mu.Lock()
			conns = conns[:0]
			for bc := range b.conns {
				conns = append(conns, bc)
			}
			b.mu.Unlock()
			for ; sent < due; sent++ {
				frame := make([]byte, hdr.Len()+b.size) // zeroed: the padding
				stamp := frame[copy(frame, hdr.Bytes()):]
				binary.BigEndian.PutUint64(stamp[:8], uint64(time.Now().UnixNano()))
				binary.BigEndian.PutUint64(stamp[8:16], uint64(sent+1))
				for _, bc := range conns {
					bc.enqueue(frame)
				}
			}
			atomicMax(&b.peak, b.queued.Load())
		}
	}
}

func (b *demoBackend) stopBroadcast() {
	b.stopOnce.Do(func() { close(b.stop) })
	if b.started.Load() {
		<-b.broadcastDone
	}
}

// stats returns the bytes queued in all connections and the largest
// single backlog.
func (b *demoBackend) stats() (queued, largest int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for bc := range b.conns {
		largest = max(largest, bc.backlog.Load())
	}
	return b.queued.Load(), largest
}

// close stops the backend and waits for all its goroutines. Idempotent.
func (b *demoBackend) close() {
	b.stopBroadcast()
	b.ln.Close()
	b.mu.Lock()
	b.closed = true
	conns := slices.Collect(maps.Keys(b.conns))
	b.mu.Unlock()
	for _, bc := range conns {
		bc.end(nil)
	}
	b.wg.Wait()
}

// --- the clients ---

// demoFleet is the demo's clients: fast ones that read everything and
// measure latency and gaps, and slow ones that freeze (see slowFreeze).
type demoFleet struct {
	url     string
	clients int
	slow    int
	freeze  time.Duration

	runLat  latencyHist                 // fast clients, whole run
	lastLat atomic.Pointer[latencyHist] // fast clients, since the last screen

	fastMsgs, fastGaps atomic.Uint64

	wakeCh  chan struct{} // closed when the load phase ends
	dialSem chan struct{} // bounds concurrent handshakes
	wg      sync.WaitGroup

	mu       sync.Mutex
	conns    map[*websocket.Conn]struct{} // guarded by mu: open connections
	deadline time.Time                    // guarded by mu: set by wake
	results  []clientResult               // guarded by mu
}

// clientResult is what one client saw.
type clientResult struct {
	slow       bool
	received   uint64
	gaps       uint64 // messages missing from the sequence
	maxLatency time.Duration
	outcome    string // how the connection ended, for the summary
}

func newDemoFleet(u string, o demoOptions, freeze time.Duration) *demoFleet {
	f := &demoFleet{
		url: u, clients: o.clients, slow: o.nSlow(), freeze: freeze,
		wakeCh: make(chan struct{}), dialSem: make(chan struct{}, 16),
		conns: make(map[*websocket.Conn]struct{}),
	}
	f.lastLat.Store(new(latencyHist))
	return f
}

// start launches every client. Slow ones are spread over the fleet so
// they connect among the fast ones. Dials stop when ctx ends.
func (f *demoFleet) start(ctx context.Context) {
	for i := range f.clients {
		slow := f.slow > 0 && i*f.slow/f.clients != (i+1)*f.slow/f.clients
		f.wg.Add(1)
		go f.demoClient(ctx, slow)
	}
}

// wake ends the load phase for the clients: frozen ones read again, and
// every read gives up at deadline.
func (f *demoFleet) wake(deadline time.Time) {
	close(f.wakeCh)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.deadline = deadline
	for c := range f.conns {
		c.SetReadDeadline(deadline)
	}
}

func (f *demoFleet) woken() bool {
	select {
	case <-f.wakeCh:
		return true
	default:
		return false
	}
}

func (f *demoFleet) wait() { f.wg.Wait() }

func (f *demoFleet) dial(ctx context.Context, slow bool) (*websocket.Conn, error) {
	nd := &net.Dialer{Timeout: 5 * time.Second}
	if slow {
		nd.Control = func(_, _ string, c syscall.RawConn) error {
			return setSockopts(c, sockopt{syscall.SOL_SOCKET, syscall.SO_RCVBUF, slowClientRcv},
				sockopt{syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, ethernetMSS})
		}
	}
	d := websocket.Dialer{NetDialContext: nd.DialContext, HandshakeTimeout: 5 * time.Second}
	c, resp, err := d.DialContext(ctx, f.url, nil)
	if resp != nil && resp.Body != nil {
		resp.Body.Close()
	}
	return c, err
}

// demoClient is one client's whole life.
func (f *demoFleet) demoClient(ctx context.Context, slow bool) {
	defer f.wg.Done()
	res := clientResult{slow: slow}
	defer func() {
		f.mu.Lock()
		f.results = append(f.results, res)
		f.mu.Unlock()
	}()
	select {
	case f.dialSem <- struct{}{}:
	case <-ctx.Done():
		res.outcome = "never connected (the run ended first)"
		return
	}
	c, err := f.dial(ctx, slow)
	<-f.dialSem
	if err != nil {
		res.outcome = "could not connect: " + err.Error()
		if ctx.Err() != nil {
			res.outcome = "never connected (the run ended first)"
		}
		return
	}
	defer c.Close()
	f.mu.Lock()
	f.conns[c] = struct{}{}
	if !f.deadline.IsZero() {
		c.SetReadDeadline(f.deadline)
	}
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		delete(f.conns, c)
		f.mu.Unlock()
	}()

	var stamp [16]byte
	var last uint64
	frozen := false
	for {
		sent, seq, err := readStamped(c, stamp[:])
		if err != nil {
			res.outcome = closeOutcome(err)
			return
		}
		lat := time.Duration(time.Now().UnixNano() - sent)
		res.received++
		res.maxLatency = max(res.maxLatency, lat)
		var gap uint64
		if last != 0 && seq > last+1 {
			gap = seq - last - 1
		}
		res.gaps += gap
		last = max(last, seq)
		if !slow {
			f.fastMsgs.Add(1)
			f.fastGaps.Add(gap)
			f.runLat.add(lat)
			f.lastLat.Load().add(lat)
			continue
		}
		if frozen {
			continue
		}
		frozen = true
		freeze := time.NewTimer(f.freeze)
		select {
		case <-freeze.C:
		case <-f.wakeCh:
			freeze.Stop()
		}
	}
}

// readStamped reads one message and returns its send time and sequence
// number, discarding the padding.
func readStamped(c *websocket.Conn, stamp []byte) (sent int64, seq uint64, err error) {
	_, r, err := c.NextReader()
	if err != nil {
		return 0, 0, err
	}
	if _, err := io.ReadFull(r, stamp[:16]); err != nil {
		return 0, 0, err
	}
	if _, err := io.Copy(io.Discard, r); err != nil {
		return 0, 0, err
	}
	return int64(binary.BigEndian.Uint64(stamp[:8])), binary.BigEndian.Uint64(stamp[8:16]), nil
}

// closeOutcome describes how a client's connection ended.
func closeOutcome(err error) string {
	var ce *websocket.CloseError
	if errors.As(err, &ce) {
		if ce.Code == websocket.CloseAbnormalClosure {
			return outcome1006
		}
		s := fmt.Sprintf("closed with %d %s", ce.Code, closeCodeName(ce.Code))
		if ce.Text != "" {
			s += fmt.Sprintf(" (%q)", ce.Text)
		}
		return s
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "no close frame before the demo's deadline"
	}
	return outcome1006
}

const outcome1006 = "cut without a close frame (1006)"

func closeCodeName(code int) string {
	switch code {
	case 1000:
		return "Normal Closure"
	case 1001:
		return "Going Away"
	case 1002:
		return "Protocol Error"
	case 1008:
		return "Policy Violation"
	case 1009:
		return "Message Too Big"
	case 1011:
		return "Internal Error"
	case 1012:
		return "Service Restart"
	case 1013:
		return "Try Again Later"
	case 1014:
		return "Bad Gateway"
	}
	return ""
}

// outcomeCounts tallies how connections ended.
type outcomeCounts map[string]int

func (c *outcomeCounts) add(outcome string) {
	if *c == nil {
		*c = outcomeCounts{}
	}
	(*c)[outcome]++
}

// String lists the outcomes, most frequent first: "5 closed with 1013 Try
// Again Later ("slow client"); 1 cut without a close frame (1006)".
func (c outcomeCounts) String() string {
	if len(c) == 0 {
		return "none"
	}
	keys := slices.SortedFunc(maps.Keys(c), func(a, b string) int {
		return cmp.Or(cmp.Compare(c[b], c[a]), cmp.Compare(a, b))
	})
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%d %s", c[k], k)
	}
	return strings.Join(parts, "; ")
}

// --- latency histogram ---

// latencyHist counts latencies in logarithmic buckets, latSub per power of
// two from 1 µs, so a quantile is off by at most 1/latSub (12.5%). It is
// safe for concurrent use: adding is three atomic operations.
type latencyHist struct {
	counts [latBuckets]atomic.Uint64
	n      atomic.Uint64
	max    atomic.Int64
}

const (
	latSub     = 8
	latBuckets = 40 * latSub // up to 2^40 µs, about 12 days
)

func latBucket(d time.Duration) int {
	us := uint64(max(d.Microseconds(), 1))
	l := bits.Len64(us) - 1 // floor(log2(us))
	var sub uint64
	if l >= 3 {
		sub = (us >> (l - 3)) & (latSub - 1)
	} else {
		sub = (us << (3 - l)) & (latSub - 1)
	}
	return min(l*latSub+int(sub), latBuckets-1)
}

// latUpper is the upper bound of bucket i.
func latUpper(i int) time.Duration {
	l, sub := i/latSub, i%latSub
	return time.Duration((uint64(latSub+sub+1)<<l)/latSub) * time.Microsecond
}

func (h *latencyHist) add(d time.Duration) {
	h.counts[latBucket(d)].Add(1)
	h.n.Add(1)
	atomicMax(&h.max, int64(d))
}

func (h *latencyHist) count() uint64             { return h.n.Load() }
func (h *latencyHist) maxLatency() time.Duration { return time.Duration(h.max.Load()) }

// quantile returns the q-quantile (0 < q <= 1), rounded up to its bucket's
// upper bound and capped at the maximum; 0 when empty.
func (h *latencyHist) quantile(q float64) time.Duration {
	n := h.n.Load()
	if n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(n)))
	var seen uint64
	for i := range h.counts {
		seen += h.counts[i].Load()
		if seen >= rank {
			return min(latUpper(i), h.maxLatency())
		}
	}
	return h.maxLatency()
}

// --- small helpers ---

type sockopt struct{ level, name, value int }

// setSockopts sets socket options before connect or listen.
func setSockopts(c syscall.RawConn, opts ...sockopt) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		for _, o := range opts {
			if e := syscall.SetsockoptInt(int(fd), o.level, o.name, o.value); e != nil && serr == nil {
				serr = fmt.Errorf("setsockopt %d/%d: %w", o.level, o.name, e)
			}
		}
	})
	return cmp.Or(err, serr)
}

func atomicMax(a *atomic.Int64, v int64) {
	for {
		old := a.Load()
		if v <= old || a.CompareAndSwap(old, v) {
			return
		}
	}
}

// humanBytes renders n in binary units: "0 B", "812 B", "12.3 KiB".
func humanBytes(n int64) string {
	if n < 1024 {
		return fmt.Sprintf("%d B", n)
	}
	f, units := float64(n), []string{"KiB", "MiB", "GiB", "TiB"}
	i := -1
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	switch {
	case f < 10:
		return fmt.Sprintf("%.2f %s", f, units[i])
	case f < 100:
		return fmt.Sprintf("%.1f %s", f, units[i])
	}
	return fmt.Sprintf("%.0f %s", f, units[i])
}

// compactBytes is humanBytes without the space, for one-line output.
func compactBytes(n int64) string { return strings.ReplaceAll(humanBytes(n), " ", "") }

// ms renders a duration in milliseconds with a sensible precision.
func ms(d time.Duration) string {
	m := float64(d) / float64(time.Millisecond)
	switch {
	case d == 0:
		return "0 ms"
	case m < 10:
		return fmt.Sprintf("%.2f ms", m)
	case m < 1000:
		return fmt.Sprintf("%.0f ms", m)
	}
	return fmt.Sprintf("%.2f s", d.Seconds())
}

// thousands renders n with comma separators: 1234567 is "1,234,567".
func thousands(n uint64) string {
	s := fmt.Sprint(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// wrap breaks text into lines of at most width columns.
func wrap(text string, width int) string {
	var b strings.Builder
	col := 0
	for _, w := range strings.Fields(text) {
		if col > 0 && col+1+len(w) > width {
			b.WriteByte('\n')
			col = 0
		} else if col > 0 {
			b.WriteByte(' ')
			col++
		}
		b.WriteString(w)
		col += len(w)
	}
	return b.String()
}
