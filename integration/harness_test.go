// Package integration holds sluice's end-to-end tests: a real sluice Server
// on loopback between independent WebSocket implementations (gorilla and
// gobwas backends; gorilla, coder and raw-frame clients).
package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/gobwas/ws"
	gorilla "github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"go.uber.org/goleak"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/internal/wstest"
	"github.com/sluice-proxy/sluice/proxy"
)

// TestMain fails the run if any goroutine outlives the tests: every session,
// backend handler and client must have ended by then.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// sluiceUnderTest is one in-process sluice Server on 127.0.0.1:0.
type sluiceUnderTest struct {
	srv  *proxy.Server
	addr string // host:port of the listener
	url  string // ws://addr

	serveErr <-chan error
	once     sync.Once
	shutErr  error
	reg      *prometheus.Registry // its metrics, unless configure replaced the Registerer
}

// metricValue is the sum of the series name whose labels include the
// given pairs (wstest.Metric) in s's registry; the test fails when there
// is no such series.
func metricValue(t testing.TB, s *sluiceUnderTest, name string, labels ...string) float64 {
	t.Helper()
	v, ok := wstest.Metric(t, s.reg, name, labels...)
	if !ok {
		t.Fatalf("no series %s%q", name, labels)
	}
	return v
}

// harnessEnv is the configuration every sluice under test starts from,
// on top of the binary's defaults: the settings whose defaults would
// change what the tests were written to observe. Each test that needs a
// guard or a buffer size sets its own.
func harnessEnv() map[string]string {
	return map[string]string{
		config.Prefix + "LISTEN_ADDR": "127.0.0.1:0",
		config.Prefix + "ADMIN_ADDR":  "", // the harness serves no admin listener
		// The slow-ratio guard off (every client may be slow) and a
		// ceiling far above any test's queues: the backpressure tests
		// that exercise the guards set limiter.BudgetConfig themselves.
		config.Prefix + "SLOW_CLIENT_MAX_RATIO":  "1",
		config.Prefix + "GLOBAL_QUEUE_MAX_BYTES": "16GiB",
		// The kernel's receive buffer on upstream sockets, as the
		// backpressure tests' timings assume.
		config.Prefix + "UPSTREAM_READ_BUFFER": "0",
		// No keepalive pings: the first comes at a random point of the
		// first 25 s, and tests that read raw frames expect only what
		// they asked for. The keepalive tests set their own schedule.
		config.Prefix + "PING_INTERVAL": "0",
	}
}

// startSluice starts sluice in front of upstream (a ws:// URL) with the
// options the binary would build from harnessEnv, through
// config.ProxyOptions. configure, if not nil, then adjusts them. A cleanup
// shuts it down and fails the test if that fails.
func startSluice(t testing.TB, upstream string, configure func(*proxy.Options)) *sluiceUnderTest {
	t.Helper()
	return startSluiceEnv(t, upstream, nil, configure)
}

// startSluiceEnv is startSluice with SLUICE_* settings added to
// harnessEnv, checked and mapped exactly as the binary does; prefer it to
// configure for anything an operator can set.
func startSluiceEnv(t testing.TB, upstream string, env map[string]string, configure func(*proxy.Options)) *sluiceUnderTest {
	t.Helper()
	environ := harnessEnv()
	maps.Copy(environ, env)
	return startSluiceFrom(t, upstream, environ, configure)
}

// startSluiceDefaults starts sluice as the binary would with nothing set
// but its addresses and the upstream: every default as shipped, the
// guards and keepalive included.
func startSluiceDefaults(t testing.TB, upstream string, env map[string]string) *sluiceUnderTest {
	t.Helper()
	environ := map[string]string{
		config.Prefix + "LISTEN_ADDR": "127.0.0.1:0",
		config.Prefix + "ADMIN_ADDR":  "",
	}
	maps.Copy(environ, env)
	return startSluiceFrom(t, upstream, environ, nil)
}

// startSluiceFrom starts sluice configured by environ alone, then
// configure.
func startSluiceFrom(t testing.TB, upstream string, environ map[string]string, configure func(*proxy.Options)) *sluiceUnderTest {
	t.Helper()
	environ[config.Prefix+"UPSTREAM_URL"] = upstream
	cfg, err := config.Load(environ)
	if err != nil {
		t.Fatalf("configuration:\n%v", err)
	}
	log := zerolog.New(testLog(t)).Level(zerolog.InfoLevel).With().Timestamp().Logger()
	reg := prometheus.NewRegistry()
	opts, err := cfg.ProxyOptions(log, reg)
	if err != nil {
		t.Fatalf("config.ProxyOptions: %v", err)
	}
	if configure != nil {
		configure(&opts)
	}
	srv, addr, serveErr := serveSluice(t, opts)
	s := &sluiceUnderTest{srv: srv, addr: addr, url: "ws://" + addr, serveErr: serveErr, reg: reg}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), wstest.ShutdownTimeout)
		defer cancel()
		if err := s.shutdown(ctx); err != nil {
			t.Errorf("sluice Shutdown: %v", err)
		}
		if n := srv.Sessions(); n != 0 {
			t.Errorf("after Shutdown: Sessions() = %d, want 0", n)
		}
	})
	return s
}

// serveSluice builds a sluice Server from opts and serves it on
// 127.0.0.1:0 on its own goroutine. It returns the server, its host:port and
// a channel that receives what Serve returned; shutting the server down is
// the caller's part.
func serveSluice(t testing.TB, opts proxy.Options) (srv *proxy.Server, addr string, serveErr <-chan error) {
	t.Helper()
	srv, err := proxy.New(opts)
	if err != nil {
		t.Fatalf("proxy.New: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	return srv, ln.Addr().String(), served
}

// shutdown calls Shutdown once (a test may call it before the cleanup does)
// and waits for Serve to return.
func (s *sluiceUnderTest) shutdown(ctx context.Context) error {
	s.once.Do(func() {
		s.shutErr = s.srv.Shutdown(ctx)
		select {
		case err := <-s.serveErr:
			if !errors.Is(err, http.ErrServerClosed) && s.shutErr == nil {
				s.shutErr = fmt.Errorf("Serve returned %v, want http.ErrServerClosed", err)
			}
		case <-time.After(wstest.IOTimeout):
			if s.shutErr == nil {
				s.shutErr = errors.New("Serve did not return after Shutdown")
			}
		}
	})
	return s.shutErr
}

// testLog is a log destination that writes to t until t's cleanups have
// run, and drops lines after that. A session that outlives its test (a bug
// that TestShutdownWaitsForHandshakeInFlight looks for) would otherwise
// crash the whole run with "Log in goroutine after Test... has completed".
func testLog(t testing.TB) io.Writer {
	w := &lateSafeWriter{out: zerolog.NewTestWriter(t)}
	t.Cleanup(w.stop) // registered first, so it runs after the Shutdown cleanup
	return w
}

type lateSafeWriter struct {
	mu  sync.Mutex
	out io.Writer // nil once the test has ended; guarded by mu
}

func (w *lateSafeWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.out == nil {
		return len(p), nil
	}
	return w.out.Write(p)
}

func (w *lateSafeWriter) stop() {
	w.mu.Lock()
	w.out = nil
	w.mu.Unlock()
}

var idCounter atomic.Uint64

// newID names one connection so that the test can find what the backend
// recorded about it.
func newID() string { return fmt.Sprintf("c%d", idCounter.Add(1)) }

// recv waits for a value on ch for at most wstest.IOTimeout.
func recv[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(wstest.IOTimeout):
		t.Fatalf("timed out after %v waiting for %s", wstest.IOTimeout, what)
	}
	panic("unreachable")
}

// waitFor polls cond every 5 ms until it holds, failing the test after
// timeout. Only for conditions that no signal announces (session counts,
// queue depths, eviction logs, a backend's blocked write): observable
// state, not the passage of time.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// nonBlockingSend sends v on ch if ch has room (or a waiting receiver) and
// drops it otherwise, so a recorder never blocks the connection it watches.
func nonBlockingSend[T any](ch chan<- T, v T) {
	select {
	case ch <- v:
	default:
	}
}

// waitGroupWithin waits for wg for at most timeout and reports whether it
// finished. On false the goroutine that waits on wg stays until it does.
func waitGroupWithin(wg *sync.WaitGroup, timeout time.Duration) bool {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-time.After(timeout):
		return false
	}
}

// --- clients ---------------------------------------------------------------

// dialGorilla opens a gorilla/websocket client; the cleanup closes its socket.
func dialGorilla(t testing.TB, u string, header http.Header) (*gorilla.Conn, *http.Response) {
	t.Helper()
	d := gorilla.Dialer{HandshakeTimeout: wstest.IOTimeout}
	c, resp, err := d.Dial(u, header)
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("gorilla dial %s: %v (status %d)", u, err, status)
	}
	t.Cleanup(func() { c.Close() })
	return c, resp
}

// dialCoder opens a coder/websocket client; the cleanup closes its socket.
func dialCoder(t testing.TB, u string, opts *websocket.DialOptions) *websocket.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wstest.IOTimeout)
	defer cancel()
	c, _, err := websocket.Dial(ctx, u, opts)
	if err != nil {
		t.Fatalf("coder dial %s: %v", u, err)
	}
	t.Cleanup(func() { c.CloseNow() })
	return c
}

// echoTimeout bounds one echo of an n-byte message: wstest.IOTimeout, plus a
// second per MiB for large messages, which the race detector and a busy
// 2-core machine slow down a lot (the libraries copy every byte; sluice
// splices).
func echoTimeout(n int) time.Duration {
	return wstest.IOTimeout + time.Duration(n>>20)*time.Second
}

// gorillaEcho writes one message and checks that the same comes back.
func gorillaEcho(c *gorilla.Conn, typ int, msg []byte) error {
	c.SetWriteDeadline(time.Now().Add(echoTimeout(len(msg))))
	if err := c.WriteMessage(typ, msg); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	c.SetReadDeadline(time.Now().Add(echoTimeout(len(msg))))
	gotTyp, got, err := c.ReadMessage()
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if gotTyp != typ {
		return fmt.Errorf("echo type = %d, want %d", gotTyp, typ)
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("echo differs: %s", diffBytes(got, msg))
	}
	return nil
}

// coderEcho is gorillaEcho for a coder/websocket client.
func coderEcho(c *websocket.Conn, typ websocket.MessageType, msg []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*echoTimeout(len(msg)))
	defer cancel()
	if err := c.Write(ctx, typ, msg); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	gotTyp, got, err := c.Read(ctx)
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if gotTyp != typ {
		return fmt.Errorf("echo type = %v, want %v", gotTyp, typ)
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("echo differs: %s", diffBytes(got, msg))
	}
	return nil
}

// gorillaReadClose reads the next frame, which must be a close, and returns
// its code and text. gorilla answers the close itself.
func gorillaReadClose(t testing.TB, c *gorilla.Conn) *gorilla.CloseError {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(wstest.IOTimeout))
	_, msg, err := c.ReadMessage()
	if err == nil {
		t.Fatalf("got message %q, want a close", wstest.Truncate(msg))
	}
	var ce *gorilla.CloseError
	if !errors.As(err, &ce) {
		t.Fatalf("read ended with %v, want a close frame", err)
	}
	return ce
}

func diffBytes(got, want []byte) string {
	if len(got) != len(want) {
		return fmt.Sprintf("length %d, want %d", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			return fmt.Sprintf("byte %d is %#x, want %#x", i, got[i], want[i])
		}
	}
	return "equal"
}

// --- raw frames ------------------------------------------------------------

func closePayload(code ws.StatusCode, reason string) []byte {
	return ws.NewCloseFrameBody(code, reason)
}
