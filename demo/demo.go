// Package demo is `sluice demo`: a self-contained demonstration of what
// sluice protects a backend from and what each backpressure policy does.
//
// The demo puts three things on loopback: a naive broadcast backend (the
// kind of server sluice protects), sluice in front of it, and a fleet of
// fast and slow WebSocket clients with one flooding client. It runs in two
// phases, each with a fresh backend: the clients straight to the backend
// (the failure: its queues climb, the flooder gets through unchecked),
// then through sluice (the fix); the summary sets them side by side.
// Everything it starts is bounded: the number of clients by -clients, each
// phase by -duration. The demo backend's queues are deliberately unbounded
// (that is the failure sluice exists to prevent) and only the time bound
// keeps them finite. Run returns only after every goroutine it started
// has ended.
package demo

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gobwas/ws"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/admin"
	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/proxy"
	"github.com/sluice-proxy/sluice/serve"
)

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
func slowFreeze(o demoOptions, cfg config.Config) time.Duration {
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
// With a flooder, each client may send demoClientLimit messages a second.
func demoDefaults(o demoOptions) map[string]string {
	env := map[string]string{
		config.Prefix + "QUEUE_MAX_MESSAGES":     "100",  // 2 s of broadcast at -rate 50
		config.Prefix + "SLOW_CLIENT_MAX_RATIO":  "0.25", // above -slow 0.05, so the policy acts, not the guard
		config.Prefix + "GLOBAL_QUEUE_MAX_BYTES": "4MiB",
		config.Prefix + "UPSTREAM_READ_BUFFER":   "4KiB", // pause reaches the backend within a second
		// A frozen client's kernel buffers fill in under a second at the
		// demo's rate (kernelBuffered), as on a real path; the default
		// 256KiB would hide the stall for ten.
		config.Prefix + "CLIENT_WRITE_BUFFER": "32KiB",
		config.Prefix + "SHUTDOWN_TIMEOUT":    "5s",
		config.Prefix + "DRAIN_DELAY":         "0", // no load balancer sends clients to the demo
		config.Prefix + "LOG_LEVEL":           "warn",
	}
	if o.flood != 0 {
		env[config.Prefix+"CLIENT_MAX_MESSAGES_PER_SECOND"] = fmt.Sprint(demoClientLimit)
	}
	return env
}

// demoClientLimit is the message rate a client may send through sluice
// when the demo floods: far above what a real client needs, far below what
// a client stuck in a loop sends.
const demoClientLimit = 50

// defaultFlood is the flooder's rate unless -flood says otherwise.
const defaultFlood floodRate = 2000

// demoOwned are settings the demo decides itself; the environment's values
// are ignored with a note.
func demoOwned() []string {
	return []string{config.Prefix + "UPSTREAM_URL", config.Prefix + "LISTEN_ADDR", config.Prefix + "ADMIN_ADDR"}
}

// demoOptions are the command-line flags of `sluice demo`.
type demoOptions struct {
	policy    config.Policy
	policySet bool // -policy was given: it beats SLUICE_POLICY
	slow      float64
	clients   int
	duration  time.Duration
	rate      int
	size      int
	admin     string
	plain     bool
	logPath   string
	flood     floodRate // 0: no flooder
	direct    bool      // run the phase without sluice first
}

// maxBroadcast bounds what the backend sends to all clients together, in
// bytes a second, so that no combination of flags outruns the machine.
const maxBroadcast = 1 << 30

// nSlow is the number of slow clients.
func (o demoOptions) nSlow() int { return int(math.Round(float64(o.clients) * o.slow)) }

func parseDemoFlags(args []string, stderr io.Writer) (demoOptions, error) {
	o := demoOptions{flood: defaultFlood}
	policy := string(config.PolicyEvict)
	fs := flag.NewFlagSet("sluice demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&policy, "policy", policy, "what sluice does with a slow client's full queue: evict, drop or pause")
	fs.Float64Var(&o.slow, "slow", 0.05, "share of the clients that are slow, from 0 to 1")
	fs.IntVar(&o.clients, "clients", 200, "number of WebSocket clients, from 1 to 10000")
	fs.DurationVar(&o.duration, "duration", 8*time.Second, "how long each phase runs, from 1s to 1h (Ctrl-C stops early)")
	fs.IntVar(&o.rate, "rate", 50, "broadcast messages per second, from 1 to 10000")
	fs.IntVar(&o.size, "size", 1024, "bytes per message, from 16 to 1048576")
	fs.StringVar(&o.admin, "admin", "127.0.0.1:9090", "address of the status page; if busy, a free port is used")
	fs.BoolVar(&o.plain, "plain", false, "print one line per second instead of a refreshing screen")
	fs.StringVar(&o.logPath, "log", "", "write sluice's own log to this file (default: discard it)")
	fs.Var(&o.flood, "flood", "one more client sends this many messages/s toward the backend (a buggy client re-subscribing in\na loop), at most "+strconv.Itoa(maxFloodRate)+"; 0: none; max, or a bare -flood: as fast as it can")
	fs.BoolVar(&o.direct, "direct", true, "run the same clients straight to the backend first, without sluice, to compare;\n-direct=false runs only the phase through sluice")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: sluice demo [flags]\n\nRuns a naive broadcast backend and a fleet of fast and slow clients and a flooding\nclient on loopback: first straight to the backend, then through sluice, and shows\nwhat sluice and the chosen policy change. Flags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		hint := "flags only; see sluice demo -h"
		if _, err := strconv.Atoi(fs.Arg(0)); err == nil && o.flood == floodMax {
			hint = "a rate goes with =, such as -flood=" + fs.Arg(0)
		}
		return o, fmt.Errorf("demo: unexpected argument %q (%s)", fs.Arg(0), hint)
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
		bad("duration", o.duration, "a duration from 1s to 1h, such as 8s")
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
	if !config.ValidHostPort(o.admin) {
		bad("admin", o.admin, "a host:port such as 127.0.0.1:9090, or 127.0.0.1:0 for any free port")
	}
	if len(problems) > 0 {
		return o, errors.New("demo: " + strings.Join(problems, "\n      "))
	}
	return o, nil
}

// demoConfig is sluice's configuration for the demo: demoDefaults, then
// the user's SLUICE_* environment, then what the demo decides itself.
func demoConfig(environ map[string]string, o demoOptions, notes io.Writer) (config.Config, error) {
	env := demoDefaults(o)
	maps.Copy(env, environ)
	for _, k := range demoOwned() {
		if v, ok := env[k]; ok {
			if _, own := environ[k]; own && v != "" {
				fmt.Fprintf(notes, "demo: ignoring %s: the demo chooses it\n", k)
			}
			delete(env, k)
		}
	}
	if o.policySet {
		env[config.Prefix+"POLICY"] = string(o.policy)
	}
	cfg, err := config.Load(env, config.AllowNoUpstream())
	if err != nil {
		return config.Config{}, fmt.Errorf("demo: %w", err)
	}
	cfg.ListenAddr = "127.0.0.1:0"
	cfg.AdminAddr = o.admin
	return cfg, nil
}

// Run is `sluice demo` with its arguments and the process environment:
// see the usage text in parseDemoFlags. It returns when the run's
// -duration has passed or ctx ends, after the summary.
func Run(ctx context.Context, args []string, environ map[string]string, stdout, stderr io.Writer) error {
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
	log := cfg.Logger(logw)
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
	cfg  config.Config
	log  zerolog.Logger
	out  io.Writer
	tty  bool // refresh the screen in place

	srv *proxy.Server
	// Owned by run's goroutine.
	direct    *phase // nil with -direct=false, or when the run ended first
	via       *phase // through sluice; nil when the run ended before it
	statusURL string
	client    *http.Client // reads /status.json, like the page does
}

// run runs the phase without sluice, then the one through it, and prints
// the summary. Ctrl-C ends the phase under way and skips the next.
func (d *demo) run(ctx context.Context) error {
	o := d.opts
	fmt.Fprintf(d.out, "sluice demo: %d clients (%d slow), %d messages/s of %d bytes", o.clients, o.nSlow(), o.rate, o.size)
	if o.flood != 0 {
		fmt.Fprintf(d.out, ", and a flooder sending %s", o.flood.describe())
	}
	fmt.Fprintf(d.out, "; %s a phase\n", o.duration)
	if o.direct {
		fmt.Fprintln(d.out, "\n1. without sluice: the clients connect straight to the naive backend")
		p, err := d.runDirect(ctx)
		if err != nil {
			return err
		}
		d.direct = p
		if ctx.Err() != nil {
			d.summary()
			return nil
		}
		fmt.Fprint(d.out, "\n2. ")
	}
	if err := d.runSluice(ctx); err != nil {
		return err
	}
	d.summary()
	return nil
}

// runSluice is the phase through sluice: it starts a fresh backend and
// sluice in front of it, shows the screen until the duration ends or ctx
// is cancelled, and stops everything in order.
func (d *demo) runSluice(ctx context.Context) error {
	o := d.opts
	p := &phase{viaSluice: true}
	if err := d.startBackend(p); err != nil {
		return err
	}
	defer p.closeBackend() // idempotent; the normal path closes it earlier

	d.cfg.UpstreamURL = &url.URL{Scheme: "ws", Host: p.backendLn.Addr().String(), Path: "/feed"}
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

	fmt.Fprintf(d.out, "through sluice: policy %s", o.policy)
	if o.flood != 0 {
		fmt.Fprintf(d.out, ", %s", clientLimit(d.cfg))
	}
	fmt.Fprintf(d.out, "\nstatus page: http://%s/status\n", adminAddr)

	loadCtx, endLoad := context.WithTimeout(ctx, o.duration)
	defer endLoad()
	d.via = p
	d.startLoad(loadCtx, p, "ws://"+wsAddr+"/feed", slowFreeze(o, d.cfg))
	d.watch(loadCtx, p)
	p.endLoad()

	// Teardown, in the order that lets every party see a clean end.
	if st, err := d.fetchStatus(5 * time.Second); err == nil {
		p.lastStatus = st
	}
	// Frozen clients read again and learn how their connection ended;
	// every client gets a deadline so none can wait forever.
	p.fleet.wake(time.Now().Add(d.cfg.ShutdownTimeout + 5*time.Second))
	stopSluice() // drain: 1001 to every client after its queued data
	serveErr := <-serveDone
	p.fleet.wait()
	if p.flood != nil {
		p.flood.wait()
	}
	p.closeBackend()
	tr.CloseIdleConnections()
	if serveErr != nil {
		return fmt.Errorf("demo: sluice: %w", serveErr)
	}
	return nil
}

// clientLimit describes sluice's limit on what one client sends.
func clientLimit(cfg config.Config) string {
	if cfg.ClientMaxMessagesPerSecond == 0 {
		return "no client message limit (SLUICE_CLIENT_MAX_MESSAGES_PER_SECOND=0)"
	}
	return fmt.Sprintf("clients may send %d messages/s (%s)", cfg.ClientMaxMessagesPerSecond, cfg.ClientRatePolicy)
}

// startSluice runs serve.Run in a goroutine and waits until it listens. If
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
	ready := make(chan serve.Listening, 1)
	serveDone := make(chan error, 1)
	go func() {
		serveDone <- serve.Run(ctx, d.cfg, d.log, func(l serve.Listening) { ready <- l })
	}()
	select {
	case l := <-ready:
		d.srv = l.Server
		return l.Addr, l.AdminAddr, serveDone, nil
	case err := <-serveDone:
		return "", "", nil, fmt.Errorf("demo: starting sluice: %w", err)
	}
}

// fetchStatus reads /status.json: the screen shows what the page shows.
func (d *demo) fetchStatus(timeout time.Duration) (*admin.Status, error) {
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
	var s admin.Status
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		return nil, err
	}
	return &s, nil
}

// watch samples p every 100 ms for its peaks and redraws the screen
// every second until ctx ends.
func (d *demo) watch(ctx context.Context, p *phase) {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	next := p.began.Add(time.Second)
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			d.sample(p, now)
			if now.Before(next) {
				continue
			}
			next = next.Add(time.Second)
			if !p.viaSluice {
				d.drawDirect(p, now.Sub(p.began))
				continue
			}
			st, err := d.fetchStatus(time.Second)
			if st != nil {
				p.lastStatus = st
				p.peakThrottled = max(p.peakThrottled, st.Totals.Throttled)
			}
			d.draw(p, now.Sub(p.began), st, err)
		}
	}
}
