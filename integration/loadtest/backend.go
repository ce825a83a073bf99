//go:build linux

package main

import (
	"context"
	"encoding/binary"
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
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

// The backend: a naive gorilla/websocket broadcast server, the kind sluice
// is meant to protect. It runs as a separate process (this binary
// re-executed as `loadtest backend ...`) so that its memory and CPU are
// measured apart from the harness and the target.
//
// Each tick (1/rate seconds) it builds one message of size bytes whose
// first 16 carry the sequence number and the send time (big-endian
// uint64s, Unix nanoseconds) and sends it to every connected client:
// by default through an unbounded per-connection queue drained by that
// connection's own writer goroutine (-serialise: written to every
// connection in turn from the ticking goroutine, with no deadline). With
// -rate 0 it only accepts connections and reads them, answering pings.
//
// GET /stats on the same port answers backendStats as JSON.

// backendCommand is the hidden subcommand that runs the backend.
const backendCommand = "backend"

// headerLen is the part of every message that carries the sequence number
// (bytes 0-7) and the send time (bytes 8-15).
const headerLen = 16

// backendStats is what the backend reports on /stats.
type backendStats struct {
	Connected  int64 `json:"connected"`  // connections open now
	Accepted   int64 `json:"accepted"`   // upgrades so far
	Broadcasts int64 `json:"broadcasts"` // messages sent to all
	// SkippedTicks are messages never sent because the backend fell more
	// than a second behind its schedule.
	SkippedTicks int64 `json:"skipped_ticks"`
	QueuedBytes  int64 `json:"queued_bytes"` // bytes queued or being written now, all connections
	// PeakQueuedBytes is the highest QueuedBytes seen.
	PeakQueuedBytes int64 `json:"peak_queued_bytes"`
	// PeakBacklogBytes and PeakBacklogMessages are the highest backlog of
	// any one connection.
	PeakBacklogBytes    int64 `json:"peak_backlog_bytes"`
	PeakBacklogMessages int64 `json:"peak_backlog_messages"`
	WriteErrors         int64 `json:"write_errors"`
}

// backendMain runs the backend subcommand and returns the exit code.
func backendMain(args []string) int {
	fs := flag.NewFlagSet("loadtest backend", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on (loopback)")
	size := fs.Int("size", 1024, "bytes per message, at least 16")
	rate := fs.Float64("rate", 50, "messages per second to every client; 0 = idle")
	serialise := fs.Bool("serialise", false, "write to all connections from one goroutine, no queues")
	shared := fs.Bool("shared", false, "queue one shared buffer per message instead of a copy per connection")
	lifetime := fs.Duration("lifetime", 10*time.Minute, "exit after this long whatever happens")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *size < headerLen || *rate < 0 || *lifetime <= 0 {
		fmt.Fprintln(os.Stderr, "backend: want -size >= 16, -rate >= 0, -lifetime > 0")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *lifetime)
	defer cancel()
	if err := serveBackend(ctx, *listen, *size, *rate, *serialise, *shared, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "backend:", err)
		return 1
	}
	return 0
}

// serveBackend runs the backend until ctx ends. It writes one JSON line
// {"addr": "host:port"} to ready once it listens.
func serveBackend(ctx context.Context, listen string, size int, rate float64, serialise, shared bool, ready io.Writer) error {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	b := &broadcaster{size: size, serialise: serialise, shared: shared, queues: rate > 0 && !serialise,
		conns: map[*backendConn]struct{}{}}
	mux := http.NewServeMux()
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(b.stats())
	})
	mux.HandleFunc("/", b.serveWS)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	if err := json.NewEncoder(ready).Encode(map[string]string{"addr": ln.Addr().String()}); err != nil {
		srv.Close()
		return err
	}
	var ticks sync.WaitGroup
	if rate > 0 {
		ticks.Add(1)
		go func() {
			defer ticks.Done()
			b.broadcastLoop(ctx, time.Duration(float64(time.Second)/rate))
		}()
	}
	<-ctx.Done()
	srv.Close() // the listener; hijacked connections are ours to close
	b.closeAll()
	ticks.Wait()
	b.handlers.Wait()
	return nil
}

// broadcaster is the backend's state.
type broadcaster struct {
	size      int
	serialise bool // one goroutine writes to every connection
	shared    bool // queue the same buffer for every connection
	queues    bool // connections have a queue and a writer goroutine

	mu      sync.Mutex
	conns   map[*backendConn]struct{} // open connections; guarded by mu
	closing bool                      // no more connections; guarded by mu

	handlers sync.WaitGroup // one per connection handler and writer

	accepted, connected, broadcasts, writeErrors atomic.Int64
	skipped                                      atomic.Int64 // ticks not sent
	queued, peakQueued                           atomic.Int64
	peakBacklogBytes, peakBacklogMessages        atomic.Int64
}

// backendConn is one client connection of the backend.
type backendConn struct {
	ws   *websocket.Conn
	wake chan struct{} // buffered 1: the queue has work, or the conn closed

	mu       sync.Mutex
	queue    [][]byte // waiting to be written; guarded by mu
	backlog  int64    // bytes queued or being written; guarded by mu
	inFlight int64    // messages queued or being written; guarded by mu
	closed   bool     // guarded by mu
}

var upgrader = websocket.Upgrader{
	ReadBufferSize:  1024,
	WriteBufferSize: 4096,
	WriteBufferPool: &sync.Pool{}, // idle connections hold no write buffer
	CheckOrigin:     func(*http.Request) bool { return true },
}

// serveWS upgrades and then reads the connection until it ends (gorilla
// answers pings and close frames while reading).
func (b *broadcaster) serveWS(w http.ResponseWriter, r *http.Request) {
	ws, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	c := &backendConn{ws: ws, wake: make(chan struct{}, 1)}
	b.mu.Lock()
	if b.closing {
		b.mu.Unlock()
		ws.Close()
		return
	}
	b.conns[c] = struct{}{}
	b.handlers.Add(1)
	b.mu.Unlock()
	defer b.handlers.Done()
	b.accepted.Add(1)
	b.connected.Add(1)
	if b.queues {
		b.handlers.Add(1)
		go func() {
			defer b.handlers.Done()
			b.queueWriter(c)
		}()
	}
	for {
		if _, rd, err := ws.NextReader(); err != nil {
			break
		} else if _, err := io.Copy(io.Discard, rd); err != nil {
			break
		}
	}
	b.drop(c)
}

// drop forgets c, frees its queue and closes its socket (which ends a
// write in progress).
func (b *broadcaster) drop(c *backendConn) {
	b.mu.Lock()
	_, ok := b.conns[c]
	delete(b.conns, c)
	b.mu.Unlock()
	if !ok {
		return
	}
	b.connected.Add(-1)
	c.mu.Lock()
	c.closed = true
	var freed int64
	for _, m := range c.queue {
		freed += int64(len(m))
	}
	c.backlog -= freed
	c.inFlight -= int64(len(c.queue))
	c.queue = nil
	c.mu.Unlock()
	b.queued.Add(-freed)
	c.ws.Close()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// closeAll drops every connection and refuses new ones.
func (b *broadcaster) closeAll() {
	b.mu.Lock()
	b.closing = true
	all := make([]*backendConn, 0, len(b.conns))
	for c := range b.conns {
		all = append(all, c)
	}
	b.mu.Unlock()
	for _, c := range all {
		b.drop(c)
	}
}

// broadcastLoop sends one message per interval to every connection until
// ctx ends, on a fixed schedule: after a stall (a blocked serialised write,
// or no CPU) it catches up on the messages due, at most one second's worth;
// older ones are skipped (counted, and with no gap in sequence numbers).
func (b *broadcaster) broadcastLoop(ctx context.Context, interval time.Duration) {
	burst := max(uint64(time.Second/interval), 1)
	start := time.Now()
	timer := time.NewTimer(interval)
	defer timer.Stop()
	var ticks, seq uint64 // ticks consumed (sent or skipped); messages sent
	var targets []*backendConn
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		due := uint64(time.Since(start) / interval)
		if due-ticks > burst {
			b.skipped.Add(int64(due - ticks - burst))
			ticks = due - burst
		}
		for ; ticks < due && ctx.Err() == nil; ticks++ {
			seq++
			targets = b.broadcast(seq, targets[:0])
		}
		timer.Reset(time.Until(start.Add(time.Duration(due+1) * interval)))
	}
}

// broadcast sends message seq to every connection. targets is scratch
// space, returned for reuse.
func (b *broadcaster) broadcast(seq uint64, targets []*backendConn) []*backendConn {
	msg := make([]byte, b.size)
	binary.BigEndian.PutUint64(msg, seq)
	binary.BigEndian.PutUint64(msg[8:], uint64(time.Now().UnixNano()))
	b.broadcasts.Add(1)
	b.mu.Lock()
	for c := range b.conns {
		targets = append(targets, c)
	}
	b.mu.Unlock()
	for _, c := range targets {
		if b.serialise {
			// The naive loop: a client that does not read blocks
			// everyone behind it.
			if err := c.ws.WriteMessage(websocket.BinaryMessage, msg); err != nil {
				b.writeErrors.Add(1)
			}
			continue
		}
		m := msg
		if !b.shared {
			m = append([]byte(nil), msg...)
		}
		b.enqueue(c, m)
	}
	return targets
}

// enqueue appends m to c's queue, without bound, and wakes its writer.
func (b *broadcaster) enqueue(c *backendConn, m []byte) {
	n := int64(len(m))
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.queue = append(c.queue, m)
	c.backlog += n
	c.inFlight++
	backlog, msgs := c.backlog, c.inFlight
	c.mu.Unlock()
	raise(&b.peakBacklogBytes, backlog)
	raise(&b.peakBacklogMessages, msgs)
	raise(&b.peakQueued, b.queued.Add(n))
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// queueWriter is a connection's writer goroutine: it drains the queue
// with blocking writes and no deadline, as a naive backend does.
func (b *broadcaster) queueWriter(c *backendConn) {
	var batch [][]byte
	for range c.wake {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return
		}
		batch, c.queue = c.queue, batch[:0]
		c.mu.Unlock()
		for i, m := range batch {
			err := c.ws.WriteMessage(websocket.BinaryMessage, m)
			n := int64(len(m))
			c.mu.Lock()
			c.backlog -= n
			c.inFlight--
			c.mu.Unlock()
			b.queued.Add(-n)
			batch[i] = nil
			if err != nil {
				b.writeErrors.Add(1)
				var rest int64
				for _, m := range batch[i+1:] {
					rest += int64(len(m))
				}
				c.mu.Lock()
				c.backlog -= rest
				c.inFlight -= int64(len(batch) - i - 1)
				c.mu.Unlock()
				b.queued.Add(-rest)
				c.ws.Close() // the reader notices and drops c
				return
			}
		}
	}
}

// raise sets v to n if n is higher.
func raise(v *atomic.Int64, n int64) {
	for {
		cur := v.Load()
		if n <= cur || v.CompareAndSwap(cur, n) {
			return
		}
	}
}

func (b *broadcaster) stats() backendStats {
	return backendStats{
		Connected:           b.connected.Load(),
		Accepted:            b.accepted.Load(),
		Broadcasts:          b.broadcasts.Load(),
		SkippedTicks:        b.skipped.Load(),
		QueuedBytes:         b.queued.Load(),
		PeakQueuedBytes:     b.peakQueued.Load(),
		PeakBacklogBytes:    b.peakBacklogBytes.Load(),
		PeakBacklogMessages: b.peakBacklogMessages.Load(),
		WriteErrors:         b.writeErrors.Load(),
	}
}

// --- the harness's side -----------------------------------------------------

// backendProc is a running backend process.
type backendProc struct {
	*process
	addr string // host:port of its WebSocket and /stats listener
}

// startBackend re-executes this binary as the backend and waits for its
// address. rate 0 gives an idle backend.
func startBackend(ctx context.Context, r *runner, rate float64, lifetime time.Duration) (*backendProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find the harness binary to start the backend: %w", err)
	}
	args := []string{backendCommand, "-listen", "127.0.0.1:0", "-size", strconv.Itoa(r.cfg.size),
		"-rate", strconv.FormatFloat(rate, 'g', -1, 64), "-lifetime", lifetime.String()}
	if r.cfg.serialise {
		args = append(args, "-serialise")
	}
	if r.cfg.shared {
		args = append(args, "-shared")
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
