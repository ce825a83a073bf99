//go:build linux

package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/sluice-proxy/sluice/internal/naive"
)

// The backend: the naive broadcast server sluice is meant to protect
// (internal/naive, shared with the demo). It runs as a separate process
// (this binary re-executed as `loadtest backend ...`) so that its memory
// and CPU are measured apart from the harness and the target.
//
// Each tick (1/rate seconds) it builds one message of size bytes whose
// first 16 carry the sequence number and the send time (big-endian
// uint64s, Unix nanoseconds) and sends it to every connected client:
// by default through an unbounded per-connection queue drained by that
// connection's own writer goroutine (-serialise: written to every
// connection in turn from the ticking goroutine, with no deadline). With
// -rate 0 it only accepts connections and reads them, answering pings;
// with -echo (inbound mode) it also sends every message back after -work
// of busy CPU time, and counts messages by the client id they carry.
//
// GET /stats on the same port answers backendStats as JSON.

// backendCommand is the hidden subcommand that runs the backend.
const backendCommand = "backend"

// headerLen is the part of every message that carries the sequence number
// (bytes 0-7) and the send time (bytes 8-15).
const headerLen = naive.HeaderLen

// backendStats is what the backend reports on /stats.
type backendStats = naive.Stats

// backendMain runs the backend subcommand and returns the exit code.
func backendMain(args []string) int {
	fs := flag.NewFlagSet("loadtest backend", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on (loopback)")
	size := fs.Int("size", 1024, "bytes per message, at least 16")
	rate := fs.Float64("rate", 50, "messages per second to every client; 0 = idle")
	serialise := fs.Bool("serialise", false, "write to all connections from one goroutine, no queues")
	shared := fs.Bool("shared", false, "queue one shared buffer per message instead of a copy per connection")
	echo := fs.Bool("echo", false, "echo every message back after -work of busy CPU time (needs -rate 0)")
	work := fs.Duration("work", 0, "echo: busy CPU time per message, a calibrated loop")
	lifetime := fs.Duration("lifetime", 10*time.Minute, "exit after this long whatever happens")
	upgradeDelay := fs.Duration("upgrade-delay", 0, "storm: each upgrade waits this long before its 101, counted on /upgrades")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *size < headerLen || *rate < 0 || *lifetime <= 0 || *work < 0 || *echo && *rate != 0 || *upgradeDelay < 0 {
		fmt.Fprintln(os.Stderr, "backend: want -size >= 16, -rate >= 0 (0 with -echo), -work >= 0, -lifetime > 0, -upgrade-delay >= 0")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *lifetime)
	defer cancel()
	cfg := naive.Config{Size: *size, Rate: *rate, Serialise: *serialise, Shared: *shared, Echo: *echo, Work: *work}
	if err := serveBackend(ctx, *listen, cfg, *upgradeDelay, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "backend:", err)
		return 1
	}
	return 0
}

// serveBackend runs the backend until ctx ends, each upgrade delayed by
// upgradeDelay. It writes one JSON line {"addr": "host:port"} to ready
// once it listens.
func serveBackend(ctx context.Context, listen string, cfg naive.Config, upgradeDelay time.Duration, ready io.Writer) error {
	b, err := naive.New(cfg)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(b.Stats())
	})
	up := newUpgradeCounter(b, upgradeDelay)
	mux.HandleFunc("/upgrades", up.serveStats)
	mux.Handle("/", up)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	if err := json.NewEncoder(ready).Encode(map[string]string{"addr": ln.Addr().String()}); err != nil {
		srv.Close()
		b.Close()
		return err
	}
	b.Start()
	<-ctx.Done()
	srv.Close() // the listener; hijacked connections are the backend's to close
	b.Close()
	return nil
}

// --- the harness's side -----------------------------------------------------

// backendProc is a running backend process.
type backendProc struct {
	*process
	addr string // host:port of its WebSocket and /stats listener
}

// startBackend re-executes this binary as the backend and waits for its
// address. rate 0 gives an idle backend; in inbound mode, an echoing one.
func startBackend(ctx context.Context, r *runner, rate float64, lifetime time.Duration) (*backendProc, error) {
	return startBackendOn(ctx, r, "127.0.0.1:0", rate, lifetime)
}

// startBackendOn is startBackend listening on listen: storm mode restarts
// the backend on the address the target forwards to.
func startBackendOn(ctx context.Context, r *runner, listen string, rate float64, lifetime time.Duration) (*backendProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find the harness binary to start the backend: %w", err)
	}
	args := []string{backendCommand, "-listen", listen, "-size", strconv.Itoa(r.cfg.size),
		"-rate", strconv.FormatFloat(rate, 'g', -1, 64), "-lifetime", lifetime.String()}
	if r.cfg.serialise {
		args = append(args, "-serialise")
	}
	if r.cfg.shared {
		args = append(args, "-shared")
	}
	if r.cfg.mode == modeInbound {
		args = append(args, "-echo", "-work", r.cfg.work.String())
	}
	if r.cfg.mode == modeStorm {
		args = append(args, "-upgrade-delay", r.cfg.upgradeDelay.String())
	}
	addrc := make(chan string, 1)
	cmd := exec.Command(self, args...)
	p, err := startProcess("backend", cmd, r.stderr, r.cfg.verbose, func(line string) {
		var m struct{ Addr string }
		if json.Unmarshal([]byte(line), &m) == nil && m.Addr != "" {
			select {
			case addrc <- m.Addr:
			default:
			}
		}
	})
	if err != nil {
		return nil, err
	}
	b := &backendProc{process: p}
	select {
	case b.addr = <-addrc:
		return b, nil
	case <-p.exited:
		return nil, p.failure()
	case <-time.After(readyTimeout):
		p.stop()
		return nil, fmt.Errorf("backend did not report its address within %v", readyTimeout)
	case <-ctx.Done():
		p.stop()
		return nil, ctx.Err()
	}
}

// stats fetches the backend's /stats.
func (b *backendProc) stats() (backendStats, error) {
	var s backendStats
	client := http.Client{Timeout: 3 * time.Second}
	resp, err := client.Get("http://" + b.addr + "/stats")
	if err != nil {
		return s, fmt.Errorf("backend stats: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return s, fmt.Errorf("backend stats: %s", resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		return s, errors.Join(errors.New("backend stats"), err)
	}
	return s, nil
}
