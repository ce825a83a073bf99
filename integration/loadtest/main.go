//go:build linux

// Command loadtest is sluice's load harness (Linux only: it reads /proc
// and uses process-group signals). It starts a naive gorilla
// broadcast backend as a separate process, the target in front of it
// (nothing, the sluice binary, or any proxy command), and a fleet of
// clients; then it measures delivery latency and loss, close codes, and
// the memory and CPU of the target and of the backend. Every connection is
// on 127.0.0.0/8, every run is bounded in count and time, and every process
// the harness starts is killed (with its process group) when the run ends,
// fails or is interrupted.
//
//	go run ./integration/loadtest -mode broadcast -compare direct,sluice -clients 50 -slow 0.1 -duration 8s
//	go run ./integration/loadtest -mode broadcast -clients 2000 -sizes 64,256,1KiB,16KiB,64KiB \
//	    -total-rate 10000 -slow 0.02 -duration 20s -repeat 3 -compare direct,sluice
//	go run ./integration/loadtest -mode idle -clients 2000 -duration 10s \
//	    -compare 'sluice:SLUICE_PING_INTERVAL=0,sluice:SLUICE_PING_INTERVAL=1s;SLUICE_PONG_TIMEOUT=500ms'
//	go run ./integration/loadtest -mode handshakes -compare direct,sluice -duration 5s
//	go run ./integration/loadtest -mode inbound -work 200us -duration 15s \
//	    -compare 'sluice:flooders=0,sluice,sluice:SLUICE_CLIENT_MAX_MESSAGES_PER_SECOND=50'
//	go run ./integration/loadtest -mode storm -clients 2000 -upgrade-delay 20ms \
//	    -compare 'sluice,sluice:SLUICE_UPSTREAM_MAX_HANDSHAKES=0'
//
// Run with -help for every flag.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == backendCommand {
		os.Exit(backendMain(os.Args[2:]))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadtest:", err)
		os.Exit(1)
	}
}

// Modes.
const (
	modeBroadcast  = "broadcast"
	modeIdle       = "idle"
	modeHandshakes = "handshakes"
	modeInbound    = "inbound"
	modeStorm      = "storm"
)

// config is the parsed command line.
type config struct {
	mode      string
	targets   []targetSpec
	clients   int
	slow      float64
	slowAfter time.Duration
	slowRcv   int
	slowMSS   int
	size      int     // bytes per message; with -sizes, runAll sets it to each run's
	sizes     []int   // broadcast -sizes, in the order given; nil with -size
	rate      float64 // per client; with -total-rate, that over the clients
	totalRate float64 // broadcast -total-rate; 0 when -rate sets the rate
	serialise bool
	shared    bool
	duration  time.Duration
	timeout   time.Duration // hard cap on the whole invocation
	repeat    int
	workers   int           // handshake workers; concurrent dials in other modes
	flooders  int           // inbound: default flooding clients per target
	window    int           // inbound: a flooder's most messages awaiting their echo
	work      time.Duration // inbound: the backend's busy CPU time per message

	upgradeDelay time.Duration // storm: the restarted backend's time per upgrade

	closeWait time.Duration
	sluiceEnv []string // K=V for every sluice target
	sluiceBin string
	jsonPath  string
	profile   string // -profile DIR; "" = no profiles
	verbose   bool
	command   string // the command line, for the report
}

const usageText = `usage: go run ./integration/loadtest [flags]

Modes (-mode):
  broadcast   a backend broadcasts -size-byte messages at -rate/s to -clients
              clients, of which the -slow share stop reading after -slow-after;
              reports fast-client latency and gaps, slow-client close codes,
              and peak RSS and CPU of the target and the backend. -sizes runs
              a matrix: every size with every target, each round, a row per
              size and target. -total-rate sets the rate summed over all
              clients instead (each gets total/clients per second)
  idle        -clients idle proxied connections held for -duration; reports
              memory per connection, CPU while holding, disconnects, pings
  handshakes  -workers loops of connect + upgrade + close for -duration;
              reports upgrades per second and handshake latency
  inbound     an echo backend spending -work of CPU per message; -clients
              normal clients send -size-byte messages at -rate/s each and
              -flooders clients as fast as their -window allows; reports
              what reaches the backend (total, flooders, each normal
              client's share), normal clients' echo latency, lost and
              reordered echoes, and the target's memory and CPU
  storm       -clients (default 2000) connect and idle; the backend is stopped
              and a new one started on its address, taking -upgrade-delay
              per upgrade; every client reconnects at once with jittered
              exponential backoff (100 ms doubling to 5 s). Reports the time
              until every client is back (within -duration), the backend's
              peak upgrades in progress and upgrade rate, the clients'
              refusals, and the target's CPU meanwhile

Targets (-target, or a comma-separated list in -compare):
  direct                  clients connect to the backend itself
  sluice                  the repository's sluice binary (built once), with
                          SLUICE_LOG_LEVEL=warn, SLUICE_SHUTDOWN_TIMEOUT=5s and
                          SLUICE_DRAIN_DELAY=0 unless -sluice-env or the
                          target sets them
  sluice:K=V;K=V          sluice with these SLUICE_* settings ("," also works
                          between pairs: a piece that does not start with
                          direct, sluice or cmd: continues the previous target)
  direct:flooders=N, sluice:flooders=N;K=V
                          inbound: this target's flooders instead of -flooders
                          (so one invocation holds the run without them)
  cmd:SHELL COMMAND       any proxy, run with sh -c in the foreground; it must
                          listen on $PROXY_LISTEN (also $PROXY_HOST, $PROXY_PORT)
                          and forward to $BACKEND_ADDR ($BACKEND_HOST,
                          $BACKEND_PORT, $BACKEND_URL); it counts as up once
                          the port accepts

A target's own SLUICE_* settings win over -sluice-env's.
Example: -compare 'direct,sluice:SLUICE_POLICY=evict,sluice:SLUICE_POLICY=drop,sluice:SLUICE_POLICY=pause'

The size matrix (broadcast): the same total message rate at every fan-out, so
that rows compare CPU per delivered message across sizes and clients:
  go run ./integration/loadtest -mode broadcast -clients 200 -sizes 64,256,1KiB,16KiB,64KiB \
      -total-rate 10000 -slow 0.02 -duration 20s -repeat 3 -compare 'direct,sluice,cmd:haproxy -f /tmp/h.cfg'

Profiles (-profile DIR): every sluice target runs with SLUICE_PPROF=true, and
each run's measured window (the broadcast window, the idle hold, the handshake
loop) gets a CPU profile over its whole seconds (at least 1) and a heap profile
at its end, written to DIR as MODE-TARGET-rROUND.cpu.pprof and .heap.pprof
(TARGET: the label in [a-z0-9._-]; with -sizes, MODE-TARGET-SIZE-rROUND, SIZE
such as 64B or 16KiB). Other targets get none. A profile that cannot be
fetched is reported and noted, and does not fail the run.
  go run ./integration/loadtest -mode idle -clients 500 -duration 5s -profile /tmp/prof
  go tool pprof -top /tmp/prof/idle-sluice-r1.heap.pprof

Output: a markdown table on stdout, a row per target (with -sizes, per size and
target, grouped by size), under the command line and the machine's load
(broadcast: with the rate to every client and in total); progress and the
children's stderr on stderr. Each run starts a fresh backend and target and
stops them (SIGTERM, then SIGKILL to the process group) when it ends, fails or
is interrupted. The exit status is 1 on any setup error, and in idle mode when
a connection failed or dropped.

Flags:
`

// parseFlags parses args into a config.
func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	var target, compare, sluiceEnv, sizes string
	fs := flag.NewFlagSet("loadtest", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.mode, "mode", modeBroadcast, "broadcast, idle, handshakes, inbound or storm")
	fs.StringVar(&target, "target", "sluice", "the target of a single run (see above)")
	fs.StringVar(&compare, "compare", "", "targets to run one after another, comma-separated; overrides -target")
	fs.IntVar(&c.clients, "clients", 0, "clients: default 100 in broadcast, 1000 in idle, 200 normal ones in inbound, 2000 in storm (up to 100000)")
	fs.DurationVar(&c.upgradeDelay, "upgrade-delay", 20*time.Millisecond, "storm: the restarted backend's time per upgrade, up to 10s")
	fs.Float64Var(&c.slow, "slow", 0.1, "broadcast: share of the clients that stop reading, 0 to 1")
	fs.DurationVar(&c.slowAfter, "slow-after", 2*time.Second, "broadcast: slow clients read this long after all are connected, then stop")
	fs.IntVar(&c.slowRcv, "slow-rcvbuf", 4096, "broadcast: SO_RCVBUF of slow clients, set before connect (0 = kernel default)")
	fs.IntVar(&c.slowMSS, "slow-mss", 1460, "broadcast: TCP_MAXSEG of slow clients, so senders size their buffers as on Ethernet rather than for loopback's 64 KiB MSS (0 = kernel default)")
	fs.IntVar(&c.size, "size", 1024, "broadcast: bytes per message, 16 to 1048576; inbound: bytes per client message, 24 to 1048576, default 64")
	fs.StringVar(&sizes, "sizes", "", "broadcast: a matrix of message sizes instead of -size: a comma-separated `LIST` of bytes, KiB or MiB, such as 64,256,1KiB,16KiB,64KiB; each round runs every size with every target")
	fs.Float64Var(&c.rate, "rate", 50, "broadcast: messages per second sent to every client, up to 10000; inbound: per normal client, default 5")
	fs.Float64Var(&c.totalRate, "total-rate", 0, "broadcast: messages per second summed over all clients instead of -rate; each client gets this divided by -clients (fractions allowed)")
	fs.IntVar(&c.flooders, "flooders", 1, "inbound: clients that send as fast as their -window allows (a target's flooders=N wins)")
	fs.IntVar(&c.window, "window", 1000, "inbound: most messages a flooder has awaiting their echo, 1 to 100000")
	fs.DurationVar(&c.work, "work", 200*time.Microsecond, "inbound: the backend's busy CPU time per message (a calibrated loop), up to 1s")
	fs.BoolVar(&c.serialise, "serialise", false, "broadcast: the backend writes to every connection in turn from one goroutine instead of per-connection queues and writers")
	fs.BoolVar(&c.shared, "shared", false, "broadcast: the backend queues one shared buffer per message instead of a copy per connection")
	fs.DurationVar(&c.duration, "duration", 20*time.Second, "measured time of each run (broadcast run, idle hold, handshake loop; in storm, the longest wait for the clients to connect, and again to be back), up to 1h")
	fs.DurationVar(&c.timeout, "timeout", 0, "hard cap on the whole invocation (0 = computed from the runs: setup, connect and teardown allowances plus -duration each)")
	fs.IntVar(&c.repeat, "repeat", 1, "run the whole comparison this many times and report medians, 1 to 20")
	fs.IntVar(&c.workers, "workers", 16, "handshakes: concurrent workers; other modes: concurrent dials while connecting")
	fs.DurationVar(&c.closeWait, "close-wait", 2*time.Second, "broadcast: after the run, how long slow clients read on to find how they were closed")
	fs.StringVar(&sluiceEnv, "sluice-env", "", "SLUICE_* settings for every sluice target: 'K=V,K=V' (or ';')")
	fs.StringVar(&c.sluiceBin, "sluice-bin", "", "use this sluice binary instead of building the repository's")
	fs.StringVar(&c.jsonPath, "json", "", "also write every run's results to this file as JSON")
	fs.StringVar(&c.profile, "profile", "", "write CPU and heap profiles of every sluice target's measured windows to `DIR` (see above)")
	fs.BoolVar(&c.verbose, "v", false, "copy all of the children's stderr (default: their first 10 lines each)")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usageText)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected argument %q (flags only; see -help)", fs.Arg(0))
	}
	c.command = commandLine(args)
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })

	var problems []error
	bad := func(format string, a ...any) { problems = append(problems, fmt.Errorf(format, a...)) }
	switch c.mode {
	case modeBroadcast:
		if c.clients == 0 {
			c.clients = 100
		}
	case modeIdle:
		if c.clients == 0 {
			c.clients = 1000
		}
	case modeHandshakes:
	case modeInbound:
		if c.clients == 0 {
			c.clients = 200
		}
		if !set["rate"] {
			c.rate = 5
		}
		if !set["size"] {
			c.size = 64
		}
		if c.size < echoHeaderLen {
			bad("-size %d: inbound messages carry a %d-byte header; want at least that", c.size, echoHeaderLen)
		}
	case modeStorm:
		if c.clients == 0 {
			c.clients = 2000
		}
		if c.upgradeDelay < 0 || c.upgradeDelay > 10*time.Second {
			bad("-upgrade-delay %v: want 0 to 10s", c.upgradeDelay)
		}
	default:
		bad("-mode %q: want broadcast, idle, handshakes, inbound or storm", c.mode)
	}
	list := target
	if compare != "" {
		list = compare
	}
	var err error
	if c.targets, err = parseTargets(list); err != nil {
		problems = append(problems, err)
	}
	profileNames(c.targets)
	if c.sluiceEnv, err = parseEnvPairs(sluiceEnv); err != nil {
		problems = append(problems, fmt.Errorf("-sluice-env: %w", err))
	}
	if c.clients < 0 || c.clients > 100000 {
		bad("-clients %d: want 1 to 100000", c.clients)
	}
	if c.slow < 0 || c.slow > 1 {
		bad("-slow %v: want 0 to 1", c.slow)
	}
	if c.slowAfter < 0 {
		bad("-slow-after %v: want >= 0", c.slowAfter)
	}
	if c.slowRcv < 0 || c.slowMSS < 0 {
		bad("-slow-rcvbuf and -slow-mss: want >= 0")
	}
	if c.size < headerLen || c.size > 1<<20 {
		bad("-size %d: want 16 to 1048576", c.size)
	}
	if set["sizes"] {
		switch {
		case c.mode != modeBroadcast:
			bad("-sizes: broadcast mode only")
		case set["size"]:
			bad("-size %d and -sizes %q: set one", c.size, sizes)
		default:
			if c.sizes, err = parseSizes(sizes); err != nil {
				problems = append(problems, err)
			}
		}
	}
	switch {
	case !set["total-rate"]:
		if c.rate <= 0 || c.rate > 10000 {
			bad("-rate %v: want above 0, up to 10000", c.rate)
		}
	case c.mode != modeBroadcast:
		bad("-total-rate: broadcast mode only")
	case set["rate"]:
		bad("-rate %v and -total-rate %v: set one (-total-rate is summed over the clients, -rate is each client's)", c.rate, c.totalRate)
	default:
		c.rate = perClientRate(c.totalRate, c.clients)
		if c.totalRate <= 0 || c.rate > 10000 {
			bad("-total-rate %v over %d clients: want above 0, up to 10000 per client", c.totalRate, c.clients)
		}
	}
	if c.mode == modeBroadcast && c.rate > 0 && c.rate*c.duration.Seconds() < 1 {
		bad("%v messages per second to each client for -duration %v is less than one message per client: "+
			"raise the rate or the duration", c.rate, c.duration)
	}
	if c.duration <= 0 || c.duration > time.Hour {
		bad("-duration %v: want above 0, up to 1h", c.duration)
	}
	if c.timeout < 0 {
		bad("-timeout %v: want >= 0", c.timeout)
	}
	if c.repeat < 1 || c.repeat > 20 {
		bad("-repeat %d: want 1 to 20", c.repeat)
	}
	if c.workers < 1 || c.workers > 1024 {
		bad("-workers %d: want 1 to 1024", c.workers)
	}
	if c.flooders < 0 || c.flooders > 1000 {
		bad("-flooders %d: want 0 to 1000", c.flooders)
	}
	if c.window < 1 || c.window > 100000 {
		bad("-window %d: want 1 to 100000", c.window)
	}
	if c.work < 0 || c.work > time.Second {
		bad("-work %v: want 0 to 1s", c.work)
	}
	if c.closeWait <= 0 || c.closeWait > time.Minute {
		bad("-close-wait %v: want above 0, up to 1m", c.closeWait)
	}
	return c, errors.Join(problems...)
}

// parseSizes parses -sizes: comma-separated message sizes in bytes, each
// a whole number optionally followed by KiB or MiB, 16 bytes to 1 MiB,
// none twice.
func parseSizes(list string) ([]int, error) {
	var out []int
	for _, piece := range strings.Split(list, ",") {
		p := strings.TrimSpace(piece)
		unit := 1
		num := p
		for _, u := range []struct {
			suffix string
			n      int
		}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"B", 1}} {
			if v, ok := strings.CutSuffix(p, u.suffix); ok {
				num, unit = strings.TrimSpace(v), u.n
				break
			}
		}
		n, err := strconv.Atoi(num)
		if err != nil || n <= 0 || n > (1<<20)/unit || n*unit < headerLen {
			return nil, fmt.Errorf("-sizes %q: %q: want a size from 16 to 1048576 bytes such as 64, 1KiB or 64KiB", list, p)
		}
		if slices.Contains(out, n*unit) {
			return nil, fmt.Errorf("-sizes %q: %s twice", list, sizeName(n*unit))
		}
		out = append(out, n*unit)
	}
	return out, nil
}

// perClientRate is the rate each of clients gets of a total rate.
func perClientRate(total float64, clients int) float64 {
	if clients <= 0 {
		return 0
	}
	return total / float64(clients)
}

// commandLine is how the report shows the invocation: as `go run` when
// the binary is go run's (or go test's) temporary build.
func commandLine(args []string) string {
	self := "go run ./integration/loadtest"
	if len(os.Args) > 0 && !strings.Contains(os.Args[0], "/go-build") {
		self = shellQuote(os.Args[0])
	}
	parts := []string{self}
	for _, a := range args {
		parts = append(parts, shellQuote(a))
	}
	return strings.Join(parts, " ")
}

// shellQuote quotes s for sh when it needs it.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./:=,+@%") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// Target kinds.
const (
	kindDirect = "direct"
	kindSluice = "sluice"
	kindCmd    = "cmd"
)

// targetSpec is one target as given on the command line.
type targetSpec struct {
	label   string   // as written
	kind    string   // kindDirect, kindSluice or kindCmd
	env     []string // sluice: SLUICE_* K=V pairs
	command string   // cmd: the shell command
	// flooders is the target's own flooder count in inbound mode
	// (flooders=N among its pairs); -1 when it has none.
	flooders int

	profileName string // sluice: the label in profile file names
}

// parseTargets splits a comma-separated target list. A piece that does not
// start with direct, sluice or cmd: continues the previous target, so
// commands and env pairs may contain commas.
func parseTargets(list string) ([]targetSpec, error) {
	var labels []string
	for _, piece := range strings.Split(list, ",") {
		p := strings.TrimSpace(piece)
		starts := p == kindDirect || p == kindSluice || strings.HasPrefix(p, kindDirect+":") ||
			strings.HasPrefix(p, kindSluice+":") || strings.HasPrefix(p, kindCmd+":")
		switch {
		case starts:
			labels = append(labels, p)
		case len(labels) > 0:
			labels[len(labels)-1] += "," + piece
		case p == "":
			return nil, errors.New("empty target list")
		default:
			return nil, fmt.Errorf("target %q: want direct, direct:flooders=N, sluice, sluice:K=V;K=V or cmd:COMMAND", p)
		}
	}
	var specs []targetSpec
	for _, l := range labels {
		s := targetSpec{label: l, flooders: -1}
		switch {
		case l == kindDirect:
			s.kind = kindDirect
		case strings.HasPrefix(l, kindDirect+":"):
			s.kind = kindDirect
			rest, n, err := harnessPairs(strings.TrimPrefix(l, kindDirect+":"))
			if err == nil && strings.TrimSpace(rest) != "" {
				err = fmt.Errorf("%q: direct takes only flooders=N", rest)
			}
			if err != nil {
				return nil, fmt.Errorf("target %q: %w", l, err)
			}
			s.flooders = n
		case l == kindSluice:
			s.kind = kindSluice
		case strings.HasPrefix(l, kindSluice+":"):
			s.kind = kindSluice
			rest, n, err := harnessPairs(strings.TrimPrefix(l, kindSluice+":"))
			if err != nil {
				return nil, fmt.Errorf("target %q: %w", l, err)
			}
			s.flooders = n
			env, err := parseEnvPairs(rest)
			if err != nil {
				return nil, fmt.Errorf("target %q: %w", l, err)
			}
			s.env = env
		case strings.HasPrefix(l, kindCmd+":"):
			s.kind = kindCmd
			s.command = strings.TrimSpace(strings.TrimPrefix(l, kindCmd+":"))
			if s.command == "" {
				return nil, fmt.Errorf("target %q: empty command", l)
			}
		default:
			return nil, fmt.Errorf("target %q: want direct, sluice, sluice:K=V;K=V or cmd:COMMAND", l)
		}
		specs = append(specs, s)
	}
	return specs, nil
}

// harnessPairs takes the harness's own pairs (flooders=N) out of a
// target's "K=V;K=V" list: it returns the rest and N, -1 when absent.
func harnessPairs(s string) (rest string, flooders int, err error) {
	flooders = -1
	var others []string
	for _, kv := range strings.FieldsFunc(s, func(r rune) bool { return r == ';' || r == ',' }) {
		v, ok := strings.CutPrefix(strings.TrimSpace(kv), "flooders=")
		if !ok {
			others = append(others, kv)
			continue
		}
		n, perr := strconv.Atoi(v)
		if perr != nil || n < 0 || n > 1000 {
			return "", 0, fmt.Errorf("%q: want flooders=N, N from 0 to 1000", kv)
		}
		flooders = n
	}
	return strings.Join(others, ";"), flooders, nil
}

// parseEnvPairs parses "K=V;K=V" (or ","), where every K is a SLUICE_*
// variable the harness does not own.
func parseEnvPairs(s string) ([]string, error) {
	var out []string
	for _, kv := range strings.FieldsFunc(s, func(r rune) bool { return r == ';' || r == ',' }) {
		kv = strings.TrimSpace(kv)
		if kv == "" {
			continue
		}
		k, _, ok := strings.Cut(kv, "=")
		if !ok || !strings.HasPrefix(k, "SLUICE_") {
			return nil, fmt.Errorf("%q: want SLUICE_NAME=value", kv)
		}
		for _, owned := range harnessOwned {
			if k == owned {
				return nil, fmt.Errorf("%s is set by the harness", k)
			}
		}
		out = append(out, kv)
	}
	return out, nil
}

// runner carries what every run needs.
type runner struct {
	cfg       config
	sluiceBin string
	stdout    io.Writer
	stderr    io.Writer
	noFile    uint64    // RLIMIT_NOFILE hard limit, which children inherit
	profiles  *profiles // nil without -profile
	round     int       // of the run in progress, from 1; set by runAll
}

// run is the whole invocation: checks, the sluice build, every run, the
// report.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	r := &runner{cfg: cfg, stdout: stdout, stderr: stderr}
	if r.noFile, err = raiseNoFile(); err != nil {
		return err
	}
	if err := r.checkFiles(); err != nil {
		return err
	}
	if cfg.profile != "" {
		if err := os.MkdirAll(cfg.profile, 0o755); err != nil {
			return fmt.Errorf("-profile: %w", err)
		}
		r.profiles = &profiles{dir: cfg.profile}
	}
	budget := cfg.timeout
	if budget == 0 {
		budget = time.Duration(cfg.repeat*len(cfg.targets)*max(len(cfg.sizes), 1)) * r.runBudget()
		if r.needsSluice() && cfg.sluiceBin == "" {
			budget += buildTimeout
		}
	}
	ctx, cancel := context.WithTimeoutCause(ctx, budget, fmt.Errorf("the invocation's time limit (%v, -timeout) passed", budget))
	defer cancel()

	if r.needsSluice() {
		if cfg.sluiceBin != "" {
			r.sluiceBin = cfg.sluiceBin
		} else {
			dir, err := os.MkdirTemp("", "loadtest-sluice-")
			if err != nil {
				return err
			}
			defer os.RemoveAll(dir)
			fmt.Fprintln(stderr, "loadtest: building sluice…")
			if r.sluiceBin, err = buildSluice(ctx, dir); err != nil {
				return err
			}
		}
	}
	host := hostInfo()
	switch cfg.mode {
	case modeBroadcast:
		res, err := runAll(ctx, r, runBroadcast)
		return finish(r, host, res, err, writeBroadcastReport)
	case modeIdle:
		res, err := runAll(ctx, r, runIdle)
		if err == nil {
			err = idleFailures(res)
		}
		return finish(r, host, res, err, writeIdleReport)
	case modeInbound:
		res, err := runAll(ctx, r, runInbound)
		return finish(r, host, res, err, writeInboundReport)
	case modeStorm:
		res, err := runAll(ctx, r, runStorm)
		return finish(r, host, res, err, writeStormReport)
	default:
		res, err := runAll(ctx, r, runHandshakes)
		return finish(r, host, res, err, writeHandshakeReport)
	}
}

// needsSluice reports whether any target is sluice.
func (r *runner) needsSluice() bool {
	for _, t := range r.cfg.targets {
		if t.kind == kindSluice {
			return true
		}
	}
	return false
}

// runBudget bounds one run: setup, connecting, the measured duration and
// teardown. The run's context ends then, whatever it is doing.
func (r *runner) runBudget() time.Duration {
	b := 60*time.Second + r.cfg.duration + 2*stopGrace
	switch r.cfg.mode {
	case modeBroadcast:
		b += max(0, broadcastWindow(r.cfg.duration, r.cfg.rate)-r.cfg.duration) + r.cfg.closeWait + time.Duration(r.cfg.clients)*5*time.Millisecond
	case modeIdle:
		b += time.Duration(r.cfg.clients) * 5 * time.Millisecond
	case modeInbound:
		b += inboundWarmup + drainMax + time.Duration(r.cfg.clients+r.maxFlooders())*5*time.Millisecond
	case modeStorm:
		b += r.cfg.duration + readyTimeout + stopGrace // connecting, then the storm, with a restart between
	}
	if r.cfg.profile != "" {
		b += profileSlack
	}
	return b
}

// runAll runs one function per target, -repeat times (targets in turn
// within each round), and returns the results by target, in round order.
// Each round starts one target further along the list: the target run
// first in a round was seen to do better (the machine quieter, the
// kernel's tables emptier), and no target should always have that place.
// With -sizes, each round runs every size in the order given, every target
// at each (r.cfg.size set to it), and the results are by cell: size i,
// target j at i*len(targets)+j (see cell). It stops at the first error,
// returning what finished.
func runAll[R any](ctx context.Context, r *runner, one func(context.Context, *runner, targetSpec) (R, error)) ([][]R, error) {
	targets := r.cfg.targets
	sizes := r.cfg.sizes
	if len(sizes) == 0 {
		sizes = []int{r.cfg.size}
	}
	res := make([][]R, len(sizes)*len(targets))
	total := r.cfg.repeat * len(res)
	n := 0
	for round := range r.cfg.repeat {
		for si, sz := range sizes {
			r.cfg.size = sz
			for k := range targets {
				j := (round + k) % len(targets)
				t := targets[j]
				i := si*len(targets) + j
				n++
				what := t.label
				if len(r.cfg.sizes) > 0 {
					what = sizeName(sz) + " " + t.label
				}
				fmt.Fprintf(r.stderr, "loadtest: [%d/%d] %s %s…\n", n, total, r.cfg.mode, what)
				start := time.Now()
				r.round = round + 1
				rctx, cancel := context.WithTimeoutCause(ctx, r.runBudget(),
					fmt.Errorf("the run's time limit (%v: setup, connecting, -duration and teardown) passed", r.runBudget()))
				out, err := one(rctx, r, t)
				if err != nil && rctx.Err() != nil {
					err = fmt.Errorf("%w: %v", err, context.Cause(rctx))
				}
				cancel()
				if err != nil {
					return res, fmt.Errorf("%s, round %d: %w", what, round+1, err)
				}
				fmt.Fprintf(r.stderr, "loadtest: [%d/%d] done in %v\n", n, total, time.Since(start).Round(100*time.Millisecond))
				res[i] = append(res[i], out)
			}
		}
	}
	return res, nil
}

// cell names the size and target of runAll's result i: without -sizes,
// the size is -size's and i the target's index.
func (c config) cell(i int) (size int, t targetSpec) {
	t = c.targets[i%len(c.targets)]
	if len(c.sizes) == 0 {
		return c.size, t
	}
	return c.sizes[i/len(c.targets)], t
}

// finish writes the report of whatever finished, and the JSON file, and
// returns runErr.
func finish[R any](r *runner, host string, res [][]R, runErr error, write func(io.Writer, *runner, [][]R)) error {
	done := 0
	for _, rs := range res {
		done += len(rs)
	}
	if r.profiles != nil {
		defer r.profiles.printWritten(r.stderr)
	}
	if done > 0 {
		fmt.Fprintf(r.stdout, "# loadtest: %s\n\n", r.cfg.mode)
		fmt.Fprintf(r.stdout, "    %s\n\n", r.cfg.command)
		fmt.Fprintf(r.stdout, "%s\n\n", host)
		write(r.stdout, r, res)
		if r.profiles != nil {
			r.profiles.writeNotes(r.stdout, r.cfg)
		}
		if r.cfg.jsonPath != "" {
			if err := writeJSON(r, res); err != nil {
				return errors.Join(runErr, err)
			}
		}
	}
	return runErr
}

// raiseNoFile raises this process's RLIMIT_NOFILE as far as it may go:
// the hard limit to 1<<20 if permitted (CAP_SYS_RESOURCE), and the soft
// limit to the hard one. Children inherit it (Go restores the original
// limit in children only when the program never set it itself), and Go
// programs such as sluice raise their soft limit to the hard one anyway.
// It returns the hard limit.
func raiseNoFile() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("getrlimit: %w", err)
	}
	if want := uint64(1 << 20); lim.Max < want {
		if syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: want, Max: want}) == nil {
			return want, nil
		}
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("setrlimit: %w", err)
	}
	return lim.Max, nil
}

// checkFiles refuses runs that would run out of file descriptors: the
// harness and the backend hold one per client, a proxy two.
func (r *runner) checkFiles() error {
	const spare = 100
	n := uint64(r.cfg.clients)
	switch r.cfg.mode {
	case modeHandshakes:
		n = uint64(r.cfg.workers)
	case modeInbound:
		n += uint64(r.maxFlooders())
	}
	need := n + spare
	for _, t := range r.cfg.targets {
		if t.kind != kindDirect {
			need = 2*n + spare
		}
	}
	if need > r.noFile {
		return fmt.Errorf("%d clients need about %d open files in the proxy but RLIMIT_NOFILE's hard limit is %d "+
			"(and raising it needs CAP_SYS_RESOURCE): lower -clients, or raise the limit (ulimit -Hn as root) before running",
			n, need, r.noFile)
	}
	return nil
}

// hostInfo describes the machine and its load for the report header.
func hostInfo() string {
	load, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(load))
	if len(f) > 3 {
		f = f[:3]
	}
	return fmt.Sprintf("%s · %s · %d CPUs · load average %s at start",
		time.Now().Format(time.RFC3339), runtime.Version(), runtime.NumCPU(), strings.Join(f, " "))
}
