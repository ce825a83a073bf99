package integration

// End-to-end tests of what sluice holds toward a backend that stops
// reading: a backend that answers the upgrade and never reads again, and
// clients that send as fast as they can. The kernel's share of sluice's
// sockets stays bounded (SLUICE_UPSTREAM_WRITE_BUFFER on the upstream legs,
// SLUICE_CLIENT_READ_BUFFER on the client legs), it is counted
// (sluice_unsent_bytes{direction="upstream"}, sluice_queued_bytes), the
// ceiling acts on it, and SLUICE_UPSTREAM_WRITE_TIMEOUT ends the sessions
// with 1014.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gobwas/ws"

	"github.com/sluice-proxy/sluice/admin"
	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/internal/wstest"
)

// deafBackend answers every upgrade and then never reads. Its handlers
// return when the test ends.
func deafBackend(t *testing.T) *wstest.RawBackend {
	t.Helper()
	stop := make(chan struct{})
	b := wstest.ServeRaw(t, wstest.RawOptions{}, func(*wstest.RawConn) { <-stop })
	t.Cleanup(func() { close(stop) }) // before the backend's own cleanup
	return b
}

// flooder is a client that sends 16 KiB binary messages as fast as its
// socket takes them, and reads what comes back until the close frame.
type flooder struct {
	c       *wstest.Client
	sent    atomic.Int64 // bytes written
	stopped chan struct{}
	done    sync.WaitGroup

	mu        sync.Mutex
	closeCode ws.StatusCode // 0 until a close frame came
	readErr   error
}

// floodMessage is 16 KiB, as in the test: inlined into a segment
// (below frame.MaxPooled), so that it goes through sluice's queue.
const floodMessage = 16 << 10

func startFlooder(t *testing.T, addr string) *flooder {
	t.Helper()
	f := &flooder{c: wstest.Dial(t, addr, "/", nil, nil), stopped: make(chan struct{})}
	msg := wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpBinary, Masked: true, Payload: make([]byte, floodMessage)})
	f.done.Add(2)
	go func() {
		defer f.done.Done()
		for off := 0; ; {
			select {
			case <-f.stopped:
				return
			default:
			}
			// A short deadline, so that stop is seen while the window is
			// shut; a write it cuts goes on where it stopped.
			f.c.Conn.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			n, err := f.c.Conn.Write(msg[off:])
			f.sent.Add(int64(n))
			off = (off + n) % len(msg)
			if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
				return
			}
		}
	}()
	go func() {
		defer f.done.Done()
		f.c.Conn.SetReadDeadline(time.Now().Add(time.Minute))
		for {
			fr, err := wstest.ReadFrame(f.c.BR)
			if err != nil {
				f.mu.Lock()
				f.readErr = err
				f.mu.Unlock()
				return
			}
			if fr.Op == ws.OpClose {
				code, _ := wstest.CloseOf(fr)
				f.mu.Lock()
				f.closeCode = code
				f.mu.Unlock()
				return
			}
		}
	}()
	t.Cleanup(func() {
		f.stop()
		f.c.Conn.Close()
		f.done.Wait()
	})
	return f
}

func (f *flooder) stop() {
	select {
	case <-f.stopped:
	default:
		close(f.stopped)
	}
}

func (f *flooder) closed() (ws.StatusCode, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closeCode, f.readErr
}

// startFlooders connects n flooders to addr.
func startFlooders(t *testing.T, addr string, n int) []*flooder {
	t.Helper()
	out := make([]*flooder, n)
	for i := range out {
		out[i] = startFlooder(t, addr)
	}
	return out
}

// waitBlocked waits until no flooder's bytes have moved for quiet: every
// buffer on their way to the deaf backend is as full as it gets.
func waitBlocked(t *testing.T, fl []*flooder, quiet time.Duration) {
	t.Helper()
	total := func() int64 {
		var n int64
		for _, f := range fl {
			n += f.sent.Load()
		}
		return n
	}
	last, since := total(), time.Now()
	waitFor(t, 20*time.Second, "the flooders to be held back", func() bool {
		if n := total(); n != last {
			last, since = n, time.Now()
			return false
		}
		return time.Since(since) >= quiet
	})
}

// sluiceSockets sums what the kernel holds in the TCP sockets of sluice
// listening on port proxyPort with its backend on backendPort, from
// /proc/net/tcp: the send queues (bytes not acknowledged) and the receive
// queues (bytes not read) of the client legs (local port proxyPort) and
// of the upstream legs (remote port backendPort). Payload bytes, without
// the kernel's per-buffer overhead.
func sluiceSockets(t testing.TB, proxyPort, backendPort int) (send, recv int64, sockets int) {
	t.Helper()
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		t.Skipf("no /proc/net/tcp: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // the header
	for sc.Scan() {
		// sl local_address rem_address st tx_queue:rx_queue ...
		fs := strings.Fields(sc.Text())
		if len(fs) < 5 || fs[3] == "0A" { // 0A: listening
			continue
		}
		if portOf(fs[1]) != proxyPort && portOf(fs[2]) != backendPort {
			continue
		}
		tx, rx, _ := strings.Cut(fs[4], ":")
		txn, _ := strconv.ParseInt(tx, 16, 64)
		rxn, _ := strconv.ParseInt(rx, 16, 64)
		send += txn
		recv += rxn
		sockets++
	}
	return send, recv, sockets
}

func hostPort(t testing.TB, hostport string) int {
	t.Helper()
	i := strings.LastIndexByte(hostport, ':')
	p, err := strconv.Atoi(hostport[i+1:])
	if err != nil {
		t.Fatalf("port of %q: %v", hostport, err)
	}
	return p
}

// TestDeafBackendMemoryBounded: 20 clients send as fast as they can to a
// backend that stopped reading. With the defaults, what sluice's sockets
// hold stays within the write and read buffers per connection, and
// sluice_queued_bytes counts what the kernel holds toward the backend
// (sluice_unsent_bytes{direction="upstream"}). With the kernel's
// autotuning the upstream send buffers alone grew to ~4 MB each.
func TestDeafBackendMemoryBounded(t *testing.T) {
	const n = 20
	b := deafBackend(t)
	s := startSluice(t, b.URL, nil)
	admin.RegisterBudgetMetrics(s.reg, s.srv.Budget())
	fl := startFlooders(t, s.addr, n)
	// Held back for ten of the guard's samples (limiter.GuardInterval):
	// the last one saw what the kernel holds now.
	waitBlocked(t, fl, 500*time.Millisecond)

	send, recv, sockets := sluiceSockets(t, hostPort(t, s.addr), hostPort(t, b.Addr))
	held := send + recv
	queued := metricValue(t, s, "sluice_queued_bytes")
	upUnsent := metricValue(t, s, "sluice_unsent_bytes", "direction", "upstream")
	clientUnsent := metricValue(t, s, "sluice_unsent_bytes", "direction", "client")
	t.Logf("%d sockets hold %d KiB (send queues %d KiB, receive queues %d KiB); queued %.0f KiB, unsent toward the backend %.0f KiB, toward clients %.0f KiB",
		sockets, held>>10, send>>10, recv>>10, queued/1024, upUnsent/1024, clientUnsent/1024)
	if sockets != 2*n {
		t.Fatalf("found %d sockets of sluice's, want %d", sockets, 2*n)
	}
	// The target: 50 such sessions hold at most 32 MiB.
	const perSession = (32 << 20) / 50
	if held > n*perSession {
		t.Errorf("sluice's sockets hold %d KiB, more than %d KiB (%d KiB per session)", held>>10, n*perSession>>10, perSession>>10)
	}
	if upUnsent <= 0 {
		t.Errorf("sluice_unsent_bytes{direction=\"upstream\"} = %v, want what the upstream legs hold", upUnsent)
	}
	if queued < float64(held)/2 {
		t.Errorf("sluice_queued_bytes = %.0f KiB, less than half of the %d KiB sluice's sockets hold", queued/1024, held>>10)
	}
	// /status shows it too.
	ctx, cancel := context.WithCancel(context.Background())
	page := admin.NewStatusPage(ctx, s.srv, s.reg, "evict")
	defer func() { cancel(); page.Wait() }()
	rec := httptest.NewRecorder()
	req := httptest.NewRequest("GET", "/status.json", nil)
	req.RemoteAddr = "127.0.0.1:40000" // the status page answers loopback peers
	admin.Handler(s.srv, s.reg, &url.URL{Scheme: "ws", Host: b.Addr}, page, false, "").ServeHTTP(rec, req)
	var doc admin.Status
	if err := json.Unmarshal(rec.Body.Bytes(), &doc); err != nil {
		t.Fatalf("/status.json: %v: %s", err, rec.Body.String())
	}
	if tot := doc.Totals; tot.UpstreamUnsentBytes <= 0 || tot.QueuedBytes < tot.UpstreamUnsentBytes {
		t.Errorf("/status.json totals: upstream_unsent_bytes %d, queued_bytes %d; want the first > 0 and part of the second", tot.UpstreamUnsentBytes, tot.QueuedBytes)
	}
	if len(doc.Top) == 0 || doc.Top[0].UpstreamBytes <= 0 {
		t.Errorf("/status.json top %+v: want the sessions holding bytes toward the backend", doc.Top)
	}
}

// TestMeasureUpstreamBuffers prints what chose the defaults of
// SLUICE_UPSTREAM_WRITE_BUFFER and SLUICE_CLIENT_READ_BUFFER (PERFORMANCE.md):
// for a few sizes, one client's throughput through sluice to a backend that
// reads, and what sluice's sockets hold with 50 clients flooding a backend
// that does not. It asserts nothing and runs only when asked:
//
//	SLUICE_MEASURE_BUFFERS=1 go test -count=1 -run TestMeasureUpstreamBuffers -v ./integration/
func TestMeasureUpstreamBuffers(t *testing.T) {
	if os.Getenv("SLUICE_MEASURE_BUFFERS") == "" {
		t.Skip("a measurement: set SLUICE_MEASURE_BUFFERS=1")
	}
	sizes := []struct{ write, read string }{
		{"0", "0"}, {"32KiB", "64KiB"}, {"64KiB", "64KiB"}, {"128KiB", "64KiB"}, {"256KiB", "64KiB"},
		{"128KiB", "16KiB"}, {"128KiB", "0"},
	}
	for _, sz := range sizes {
		env := map[string]string{
			config.Prefix + "UPSTREAM_WRITE_BUFFER": sz.write,
			config.Prefix + "CLIENT_READ_BUFFER":    sz.read,
		}
		name := "write=" + sz.write + ",read=" + sz.read
		t.Run(name, func(t *testing.T) {
			var rounds []float64
			for range 3 {
				rounds = append(rounds, measureThroughput(t, env, 1500*time.Millisecond))
			}
			slices.Sort(rounds)
			held, queued := measureDeaf(t, env, 50)
			t.Logf("RESULT %-26s one client %4.0f MB/s (median; rounds %4.0f-%4.0f); 50 senders, deaf backend: sockets hold %6.1f MiB, queued %6.1f MiB",
				name, rounds[1], rounds[0], rounds[2], float64(held)/(1<<20), queued/(1<<20))
		})
	}
}

// measureThroughput is the rate at which one client's 16 KiB messages reach
// a backend that reads and discards them, over d.
func measureThroughput(t *testing.T, env map[string]string, d time.Duration) float64 {
	var got atomic.Int64
	b := wstest.ServeRaw(t, wstest.RawOptions{}, func(c *wstest.RawConn) {
		buf := make([]byte, 256<<10)
		for {
			n, err := c.Read(buf)
			got.Add(int64(n))
			if err != nil {
				return
			}
		}
	})
	s := startSluiceEnv(t, b.URL, env, nil)
	c := wstest.Dial(t, s.addr, "/", nil, nil)
	msg := wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpBinary, Masked: true, Payload: make([]byte, floodMessage)})
	batch := make([]byte, 0, 16*len(msg))
	for range 16 {
		batch = append(batch, msg...)
	}
	// Warm up, then count.
	end := time.Now().Add(200 * time.Millisecond)
	for time.Now().Before(end) {
		c.Conn.Write(batch)
	}
	from, began := got.Load(), time.Now()
	end = began.Add(d)
	c.Conn.SetWriteDeadline(end)
	for time.Now().Before(end) {
		if _, err := c.Conn.Write(batch); err != nil {
			break
		}
	}
	return float64(got.Load()-from) / time.Since(began).Seconds() / 1e6
}

// measureDeaf is what sluice's sockets hold, send and receive queues
// (ss's skmem r + w where ss is there, else /proc/net/tcp's payload
// bytes), and sluice_queued_bytes, once n flooders of a deaf backend are
// held back.
func measureDeaf(t *testing.T, env map[string]string, n int) (held int64, queued float64) {
	b := deafBackend(t)
	s := startSluiceEnv(t, b.URL, env, nil)
	admin.RegisterBudgetMetrics(s.reg, s.srv.Budget())
	fl := startFlooders(t, s.addr, n)
	waitBlocked(t, fl, 500*time.Millisecond)
	send, recv, _ := sluiceSockets(t, hostPort(t, s.addr), hostPort(t, b.Addr))
	held = send + recv
	if mem, ok := ssMemory(hostPort(t, s.addr), hostPort(t, b.Addr)); ok {
		held = mem
	}
	queued = metricValue(t, s, "sluice_queued_bytes")
	for _, f := range fl {
		f.stop()
	}
	return held, queued
}

// ssMemory sums skmem's r (receive queue) and w (send queue) of sluice's
// sockets as ss -tm reports them: what the kernel charges, overhead
// included.
func ssMemory(proxyPort, backendPort int) (int64, bool) {
	out, err := exec.Command("ss", "-tmnH", "state", "established",
		fmt.Sprintf("( sport = :%d or dport = :%d )", proxyPort, backendPort)).Output()
	if err != nil {
		return 0, false
	}
	var sum int64
	for _, line := range strings.Split(string(out), "\n") {
		i := strings.Index(line, "skmem:(")
		if i < 0 {
			continue
		}
		fields := strings.Split(strings.TrimSuffix(line[i+len("skmem:("):], ")"), ",")
		for _, f := range fields {
			for _, p := range []string{"r", "w"} {
				if v, ok := strings.CutPrefix(f, p); ok {
					if n, err := strconv.ParseInt(v, 10, 64); err == nil {
						sum += n
					}
				}
			}
		}
	}
	return sum, true
}

// TestDeafBackendEndsSessionsWith1014: a backend that takes nothing for
// SLUICE_UPSTREAM_WRITE_TIMEOUT has stopped reading; its clients get 1014,
// without waiting for SLUICE_WRITE_TIMEOUT, which is the clients' bound.
func TestDeafBackendEndsSessionsWith1014(t *testing.T) {
	const (
		n            = 3
		writeTimeout = 500 * time.Millisecond
	)
	b := deafBackend(t)
	s := startSluiceEnv(t, b.URL, map[string]string{
		config.Prefix + "UPSTREAM_WRITE_TIMEOUT": writeTimeout.String(),
		config.Prefix + "WRITE_TIMEOUT":          "1m",
	}, nil)
	began := time.Now()
	fl := startFlooders(t, s.addr, n)
	waitFor(t, 10*time.Second, "every client's close", func() bool {
		for _, f := range fl {
			if code, err := f.closed(); code == 0 && err == nil {
				return false
			}
		}
		return true
	})
	after := time.Since(began)
	for i, f := range fl {
		if code, err := f.closed(); code != 1014 {
			t.Errorf("client %d: close %d (read error %v), want 1014", i, code, err)
		}
	}
	if after < writeTimeout {
		t.Errorf("closed %v after the flood began, before SLUICE_UPSTREAM_WRITE_TIMEOUT %v", after, writeTimeout)
	}
	waitFor(t, 10*time.Second, "the sessions to end", func() bool { return s.srv.Sessions() == 0 })
	// The upstream sockets were reset, not left to the kernel as orphans
	// holding what the backend never took.
	if _, _, left := sluiceSockets(t, -1, hostPort(t, b.Addr)); left != 0 {
		t.Errorf("%d sockets toward the backend outlive their sessions", left)
	}
	t.Logf("closed with 1014 %v after the flood began", after.Round(time.Millisecond))
}

// TestDeafBackendOverCeiling: over the global ceiling, the sessions that
// hold the most toward a backend that is not reading are closed, 1013 to
// the client, and counted as upstream_ceiling evictions; the ceiling
// counts what the kernel holds toward the backend.
func TestDeafBackendOverCeiling(t *testing.T) {
	const n = 8
	b := deafBackend(t)
	// Each session holds ~250 KiB toward the deaf backend with the
	// defaults (TestDeafBackendMemoryBounded): 8 of them pass 1 MiB.
	s := startSluiceEnv(t, b.URL, map[string]string{
		config.Prefix + "GLOBAL_QUEUE_MAX_BYTES": "1MiB",
	}, nil)
	fl := startFlooders(t, s.addr, n)
	waitFor(t, 20*time.Second, "a client's close", func() bool {
		for _, f := range fl {
			if code, err := f.closed(); code != 0 || err != nil {
				return true
			}
		}
		return false
	})
	closed := 0
	for i, f := range fl {
		code, err := f.closed()
		switch {
		case code == 1013:
			closed++
		case code != 0 || err != nil:
			t.Errorf("client %d: close %d (read error %v), want 1013 or none yet", i, code, err)
		}
	}
	if closed == 0 {
		t.Error("no client got 1013")
	}
	if v := metricValue(t, s, "sluice_evictions_total", "reason", "upstream_ceiling"); v < 1 {
		t.Errorf("sluice_evictions_total{reason=\"upstream_ceiling\"} = %v, want at least 1", v)
	}
	for _, e := range s.srv.RecentEvictions() {
		if e.Reason != "upstream_ceiling" || e.UpstreamBytes <= e.QueueBytes {
			t.Errorf("eviction %+v, want upstream_ceiling, most of its bytes toward the backend", e)
		}
	}
}
