//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Child processes, and the targets clients connect to: the backend itself
// (direct), the sluice binary, or any proxy command.

const (
	// readyTimeout bounds a child's start: listening, or answering.
	readyTimeout = 15 * time.Second
	// stopGrace is how long a child has to exit after SIGTERM before its
	// process group gets SIGKILL.
	stopGrace = 6 * time.Second
	// logTail is how many of a child's last stderr lines are kept to
	// explain a failure.
	logTail = 40
	// logEcho is how many stderr lines of each child are copied to the
	// harness's stderr without -v.
	logEcho = 10
)

// process is a child the harness started in its own process group. Every
// process is stopped by stop, which also kills whatever the child started.
type process struct {
	name string // for messages: "backend", "sluice", "cmd"
	cmd  *exec.Cmd
	pid  int
	pgid int // == pid: the child leads its group

	exited  chan struct{} // closed once Wait returned; then waitErr is set
	waitErr error

	stderr *lineSink
	stopMu sync.Mutex // serialises stop
}

// startProcess starts cmd in a new process group that dies with the
// harness (Pdeathsig), copying stderr lines to the harness's stderr
// (prefixed with name, logEcho lines unless verbose) and keeping the last
// ones to explain failures.
func startProcess(name string, cmd *exec.Cmd, stderr io.Writer, verbose bool, onStdoutLine func(string)) (*process, error) {
	p := &process{name: name, cmd: cmd, exited: make(chan struct{})}
	echo := logEcho
	if verbose {
		echo = math.MaxInt
	}
	p.stderr = &lineSink{prefix: name + ": ", echo: stderr, echoMax: echo}
	cmd.Stderr = p.stderr
	if onStdoutLine != nil {
		cmd.Stdout = &lineSink{onLine: onStdoutLine}
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	// Grandchildren may hold the pipes open; do not wait for them forever.
	cmd.WaitDelay = 2 * time.Second
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p.pid = cmd.Process.Pid
	p.pgid = p.pid
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// stop ends the process group: SIGTERM, then SIGKILL after stopGrace, and
// SIGKILL again for members that outlived the leader. Safe to call twice.
func (p *process) stop() {
	if p == nil {
		return
	}
	p.stopMu.Lock()
	defer p.stopMu.Unlock()
	select {
	case <-p.exited:
	default:
		syscall.Kill(-p.pgid, syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(stopGrace):
			fmt.Fprintf(p.stderr.echo, "loadtest: %s did not exit %v after SIGTERM; killing it\n", p.name, stopGrace)
		}
	}
	syscall.Kill(-p.pgid, syscall.SIGKILL) // leftovers; ESRCH when none
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
	}
	p.stderr.flushSuppressed()
}

// alive reports whether the leader has not exited.
func (p *process) alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// failure describes how p ended, with its last stderr lines.
func (p *process) failure() error {
	tail := p.stderr.tail()
	if tail != "" {
		tail = "\n" + tail
	}
	return fmt.Errorf("%s exited: %v%s", p.name, p.waitErr, tail)
}

// lineSink is an io.Writer that splits output into lines: it keeps the last
// logTail, echoes up to echoMax to echo with prefix, and hands each to
// onLine.
type lineSink struct {
	prefix  string
	echo    io.Writer
	echoMax int
	onLine  func(string)

	mu         sync.Mutex // guards the fields below
	partial    []byte
	last       []string
	echoed     int
	suppressed int
}

func (s *lineSink) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.partial = append(s.partial, b...)
	for {
		i := bytes.IndexByte(s.partial, '\n')
		if i < 0 {
			break
		}
		line := string(s.partial[:i])
		s.partial = s.partial[i+1:]
		if s.onLine != nil {
			s.onLine(line)
		}
		s.last = append(s.last, line)
		if len(s.last) > logTail {
			s.last = s.last[1:]
		}
		if s.echo != nil {
			if s.echoed < s.echoMax {
				s.echoed++
				fmt.Fprintf(s.echo, "%s%s\n", s.prefix, line)
			} else {
				s.suppressed++
			}
		}
	}
	return len(b), nil
}

// tail is the last lines written, indented.
func (s *lineSink) tail() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	lines := slices.Clone(s.last)
	if len(s.partial) > 0 {
		lines = append(lines, string(s.partial))
	}
	for i := range lines {
		lines[i] = "    " + lines[i]
	}
	return strings.Join(lines, "\n")
}

// flushSuppressed notes how many lines were not echoed.
func (s *lineSink) flushSuppressed() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.echo != nil && s.suppressed > 0 {
		fmt.Fprintf(s.echo, "%s(%d more lines not shown; -v shows them)\n", s.prefix, s.suppressed)
		s.suppressed = 0
	}
}

// --- targets ----------------------------------------------------------------

// target is what the clients connect to for one run.
type target struct {
	spec  targetSpec
	url   string   // ws://host:port/ for clients
	admin string   // sluice's admin host:port; "" for other targets
	proc  *process // nil for direct: the backend is the target
}

// stop stops the target's process, if it has one.
func (t *target) stop() {
	if t != nil {
		t.proc.stop()
	}
}

// harnessOwned are the sluice variables the harness sets itself.
var harnessOwned = []string{"SLUICE_UPSTREAM_URL", "SLUICE_LISTEN_ADDR", "SLUICE_ADMIN_ADDR"}

// sluiceDefaults apply unless -sluice-env or the target says otherwise.
// No drain delay: no load balancer sends the harness's clients, and the
// delay must stay below the shutdown timeout.
var sluiceDefaults = []string{"SLUICE_LOG_LEVEL=warn", "SLUICE_SHUTDOWN_TIMEOUT=5s", "SLUICE_DRAIN_DELAY=0"}

// startTarget starts spec in front of the backend at backendAddr and waits
// until it accepts connections.
// runParts are what every run starts: the backend, the target in front of
// it, and the monitor sampling both.
type runParts struct {
	be  *backendProc
	tg  *target
	mon *monitor
}

// startRun starts a run's backend (broadcasting at rate; 0 for none), the
// target spec in front of it, and a monitor sampling both every interval,
// scraping the target's admin listener when scrape is set.
func startRun(ctx context.Context, r *runner, spec targetSpec, rate float64, every time.Duration, scrape bool) (*runParts, error) {
	be, err := startBackend(ctx, r, rate, r.runBudget())
	if err != nil {
		return nil, err
	}
	tg, err := startTarget(ctx, r, spec, be.addr)
	if err != nil {
		be.stop()
		return nil, err
	}
	admin := ""
	if scrape {
		admin = tg.admin
	}
	return &runParts{be: be, tg: tg, mon: newMonitor(every, admin, tg.proc, be.process)}, nil
}

// stop ends the monitor, the target and the backend, in that order.
func (p *runParts) stop() {
	p.mon.stopMonitor()
	p.tg.stop()
	p.be.stop()
}

// measuredWindow waits out a run's measured window of d, and fails it
// when ctx ends or the backend or the target dies meanwhile.
func measuredWindow(ctx context.Context, mode string, be *backendProc, tg *target, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return fmt.Errorf("%s run: %w", mode, ctx.Err())
	case <-be.exited:
		return be.failure()
	case <-t.C:
	}
	if tg.proc != nil && !tg.proc.alive() {
		return tg.proc.failure()
	}
	return nil
}

func startTarget(ctx context.Context, r *runner, spec targetSpec, backendAddr string) (*target, error) {
	backendURL := "ws://" + backendAddr + "/"
	switch spec.kind {
	case kindDirect:
		return &target{spec: spec, url: backendURL}, nil
	case kindSluice:
		listen, err1 := freeAddr()
		admin, err2 := freeAddr()
		if err := errors.Join(err1, err2); err != nil {
			return nil, err
		}
		env := withoutSluiceVars(os.Environ())
		env = append(env, sluiceDefaults...)
		env = append(env, r.cfg.sluiceEnv...)
		env = append(env, spec.env...)
		if r.profiles != nil {
			env = append(env, "SLUICE_PPROF=true") // last: it wins
		}
		env = append(env, "SLUICE_UPSTREAM_URL="+backendURL, "SLUICE_LISTEN_ADDR="+listen, "SLUICE_ADMIN_ADDR="+admin)
		cmd := exec.Command(r.sluiceBin)
		cmd.Env = env
		p, err := startProcess("sluice", cmd, r.stderr, r.cfg.verbose, nil)
		if err != nil {
			return nil, err
		}
		t := &target{spec: spec, url: "ws://" + listen + "/", admin: admin, proc: p}
		if err := waitReady(ctx, p, listen, "http://"+admin+"/healthz"); err != nil {
			t.stop()
			return nil, err
		}
		return t, nil
	case kindCmd:
		listen, err := freeAddr()
		if err != nil {
			return nil, err
		}
		host, port, _ := net.SplitHostPort(listen)
		bhost, bport, _ := net.SplitHostPort(backendAddr)
		cmd := exec.Command("/bin/sh", "-c", spec.command)
		cmd.Env = append(os.Environ(),
			"PROXY_LISTEN="+listen, "PROXY_HOST="+host, "PROXY_PORT="+port,
			"BACKEND_ADDR="+backendAddr, "BACKEND_HOST="+bhost, "BACKEND_PORT="+bport, "BACKEND_URL="+backendURL)
		p, err := startProcess("cmd", cmd, r.stderr, r.cfg.verbose, nil)
		if err != nil {
			return nil, err
		}
		t := &target{spec: spec, url: "ws://" + listen + "/", proc: p}
		if err := waitReady(ctx, p, listen, ""); err != nil {
			t.stop()
			return nil, err
		}
		return t, nil
	}
	return nil, fmt.Errorf("unknown target kind %q", spec.kind)
}

// waitReady polls until addr accepts TCP connections and health (if set)
// answers 200, failing if p exits or readyTimeout passes.
func waitReady(ctx context.Context, p *process, addr, health string) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	client := http.Client{Timeout: time.Second}
	for {
		if !p.alive() {
			return p.failure()
		}
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			if health == "" {
				return nil
			}
			if resp, err := client.Get(health); err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					return nil
				}
			}
		}
		select {
		case <-ctx.Done():
			if ctx.Err() == context.DeadlineExceeded {
				return fmt.Errorf("%s did not accept connections on %s within %v%s", p.name, addr, readyTimeout, "\n"+p.stderr.tail())
			}
			return ctx.Err()
		case <-p.exited:
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// freeAddr finds a free loopback port. Another process could take it
// before the child binds it; on loopback in a test run that is rare, and the
// child then fails to start with a clear error.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("find a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// withoutSluiceVars drops SLUICE_* variables from env: sluice rejects ones
// it does not know, and the harness decides the others.
func withoutSluiceVars(env []string) []string {
	return slices.DeleteFunc(slices.Clone(env), func(kv string) bool { return strings.HasPrefix(kv, "SLUICE_") })
}

// buildTimeout bounds building sluice.
const buildTimeout = 5 * time.Minute

// buildSluice builds the sluice binary from the module root into dir.
func buildSluice(ctx context.Context, dir string) (string, error) {
	root, err := moduleRoot(ctx)
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "sluice")
	ctx, cancel := context.WithTimeout(ctx, buildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, ".")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build sluice in %s: %w\n%s", root, err, out)
	}
	return bin, nil
}

// moduleRoot finds the root of the sluice module from the working
// directory.
func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside a Go module: run from the sluice repository, or pass -sluice-bin")
	}
	b, err := os.ReadFile(gomod)
	if err != nil {
		return "", err
	}
	if !bytes.HasPrefix(b, []byte("module github.com/sluice-proxy/sluice\n")) && !bytes.HasPrefix(b, []byte("module github.com/sluice-proxy/sluice\r\n")) {
		return "", fmt.Errorf("%s is not the sluice module: run from the sluice repository, or pass -sluice-bin", gomod)
	}
	return filepath.Dir(gomod), nil
}

// --- sluice metrics ---------------------------------------------------------

// metricSet is a parsed Prometheus text exposition: each sample line's
// value by metric name and label text ("" when unlabelled).
type metricSet map[string]map[string]float64

// scrapeMetrics fetches and parses http://admin/metrics.
func scrapeMetrics(admin string, timeout time.Duration) (metricSet, error) {
	client := http.Client{Timeout: timeout}
	resp, err := client.Get("http://" + admin + "/metrics")
	if err != nil {
		return nil, fmt.Errorf("scrape sluice metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape sluice metrics: %s", resp.Status)
	}
	ms := metricSet{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		sp := strings.LastIndexByte(line, ' ')
		if sp < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[sp+1:], 64)
		if err != nil {
			continue
		}
		name, labels := line[:sp], ""
		if i := strings.IndexByte(name, '{'); i >= 0 {
			name, labels = name[:i], name[i:]
		}
		if ms[name] == nil {
			ms[name] = map[string]float64{}
		}
		ms[name][labels] = v
	}
	return ms, sc.Err()
}

// sum adds up every sample of name.
func (ms metricSet) sum(name string) float64 {
	var s float64
	for _, v := range ms[name] {
		s += v
	}
	return s
}

// byLabel sums name's samples by the value of label, omitting zeros.
func (ms metricSet) byLabel(name, label string) map[string]float64 {
	out := map[string]float64{}
	for labels, v := range ms[name] {
		if v == 0 {
			continue
		}
		key := "?"
		if _, rest, ok := strings.Cut(labels, label+`="`); ok {
			key, _, _ = strings.Cut(rest, `"`)
		}
		out[key] += v
	}
	return out
}
