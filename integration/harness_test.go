// Package integration holds sluice's end-to-end tests: a real sluice Server
// on loopback between independent WebSocket implementations (gorilla and
// gobwas backends; gorilla, coder and raw-frame clients).
package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"strings"
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

	"sluice/config"
	"sluice/proxy"
)

// TestMain fails the run if any goroutine outlives the tests: every session,
// backend handler and client must have ended by then.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// ioTimeout bounds every read, write and wait, so a failure cannot hang.
const ioTimeout = 5 * time.Second

// shutdownTimeout bounds the Shutdown that ends each proxy.
const shutdownTimeout = 10 * time.Second

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

// metricValue is the value of the counter or gauge name{label="value"} in
// s's registry; the test fails when there is no such series.
func metricValue(t testing.TB, s *sluiceUnderTest, name, label, value string) float64 {
	t.Helper()
	families, err := s.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					if c := m.GetCounter(); c != nil {
						return c.GetValue()
					}
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	t.Fatalf("no series %s{%s=%q}", name, label, value)
	return 0
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
		ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
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
		case <-time.After(ioTimeout):
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

// recv waits for a value on ch for at most ioTimeout.
func recv[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(ioTimeout):
		t.Fatalf("timed out after %v waiting for %s", ioTimeout, what)
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
	d := gorilla.Dialer{HandshakeTimeout: ioTimeout}
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
	ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
	defer cancel()
	c, _, err := websocket.Dial(ctx, u, opts)
	if err != nil {
		t.Fatalf("coder dial %s: %v", u, err)
	}
	t.Cleanup(func() { c.CloseNow() })
	return c
}

// echoTimeout bounds one echo of an n-byte message: ioTimeout, plus a
// second per MiB for large messages, which the race detector and a busy
// 2-core machine slow down a lot (the libraries copy every byte; sluice
// splices).
func echoTimeout(n int) time.Duration {
	return ioTimeout + time.Duration(n>>20)*time.Second
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
	c.SetReadDeadline(time.Now().Add(ioTimeout))
	_, msg, err := c.ReadMessage()
	if err == nil {
		t.Fatalf("got message %q, want a close", truncate(msg))
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

func truncate(b []byte) string {
	if len(b) > 64 {
		return string(b[:64]) + "..."
	}
	return string(b)
}

// --- raw frames ------------------------------------------------------------

// rawClient speaks WebSocket frame by frame over a plain socket, so a test
// controls fragmentation, masking and protocol violations exactly.
type rawClient struct {
	conn net.Conn
	br   *bufio.Reader
	resp *http.Response
}

// dialRaw writes an upgrade request for path with the extra header lines
// (each "Name: value") and reads sluice's 101. Anything written in
// pipelined goes in the same write as the request.
func dialRaw(t testing.TB, addr, path string, extra []string, pipelined []byte) *rawClient {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, ioTimeout)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	key := newKey()
	var req bytes.Buffer
	fmt.Fprintf(&req, "GET %s HTTP/1.1\r\nHost: %s\r\n", path, addr)
	hasConnection := false
	for _, l := range extra {
		if strings.HasPrefix(strings.ToLower(l), "connection:") {
			hasConnection = true
		}
		req.WriteString(l + "\r\n")
	}
	if !hasConnection {
		req.WriteString("Connection: Upgrade\r\n")
	}
	fmt.Fprintf(&req, "Upgrade: websocket\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n", key)
	req.Write(pipelined)
	conn.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := conn.Write(req.Bytes()); err != nil {
		t.Fatalf("write upgrade request: %v", err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("read upgrade response: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		t.Fatalf("upgrade answered %s: %q", resp.Status, body)
	}
	if got, want := resp.Header.Get("Sec-Websocket-Accept"), acceptKey(key); got != want {
		t.Fatalf("Sec-WebSocket-Accept = %q, want %q", got, want)
	}
	conn.SetDeadline(time.Time{})
	return &rawClient{conn: conn, br: br, resp: resp}
}

func newKey() string {
	var b [16]byte
	rand.Read(b[:])
	return base64.StdEncoding.EncodeToString(b[:])
}

func acceptKey(key string) string {
	h := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	return base64.StdEncoding.EncodeToString(h[:])
}

// rawFrame is one frame as seen on the wire, payload unmasked.
type rawFrame struct {
	Fin     bool
	Rsv     byte
	Op      ws.OpCode
	Masked  bool
	Payload []byte
}

func (f rawFrame) String() string {
	return fmt.Sprintf("{op=%d fin=%v rsv=%d masked=%v len=%d %q}", f.Op, f.Fin, f.Rsv, f.Masked, len(f.Payload), truncate(f.Payload))
}

// encodeFrame renders f, masking it with a fresh key when f.Masked.
func encodeFrame(f rawFrame) []byte {
	h := ws.Header{Fin: f.Fin, Rsv: f.Rsv, OpCode: f.Op, Length: int64(len(f.Payload)), Masked: f.Masked}
	p := append([]byte(nil), f.Payload...)
	if f.Masked {
		h.Mask = ws.NewMask()
		ws.Cipher(p, h.Mask, 0)
	}
	var b bytes.Buffer
	ws.WriteHeader(&b, h)
	b.Write(p)
	return b.Bytes()
}

// maxRawPayload bounds what readFrame allocates on a peer's word.
const maxRawPayload = 64 << 20

// readFrame reads one frame from r.
func readFrame(r io.Reader) (rawFrame, error) {
	h, err := ws.ReadHeader(r)
	if err != nil {
		return rawFrame{}, err
	}
	if h.Length > maxRawPayload {
		return rawFrame{}, fmt.Errorf("frame of %d bytes is too long for the test", h.Length)
	}
	p := make([]byte, h.Length)
	if _, err := io.ReadFull(r, p); err != nil {
		return rawFrame{}, err
	}
	if h.Masked {
		ws.Cipher(p, h.Mask, 0)
	}
	return rawFrame{Fin: h.Fin, Rsv: h.Rsv, Op: h.OpCode, Masked: h.Masked, Payload: p}, nil
}

func (c *rawClient) write(t testing.TB, frames ...rawFrame) {
	t.Helper()
	var b []byte
	for _, f := range frames {
		b = append(b, encodeFrame(f)...)
	}
	c.conn.SetWriteDeadline(time.Now().Add(ioTimeout))
	if _, err := c.conn.Write(b); err != nil {
		t.Fatalf("raw write: %v", err)
	}
}

func (c *rawClient) read(t testing.TB) rawFrame {
	t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(ioTimeout))
	f, err := readFrame(c.br)
	if err != nil {
		t.Fatalf("raw read: %v", err)
	}
	return f
}

// readClose reads frames until a close frame and returns its code and
// reason; data frames before it fail the test.
func (c *rawClient) readClose(t testing.TB) (ws.StatusCode, string) {
	t.Helper()
	for {
		f := c.read(t)
		switch f.Op {
		case ws.OpPing, ws.OpPong:
			continue
		case ws.OpClose:
			if f.Masked {
				t.Errorf("close frame from sluice is masked")
			}
			if len(f.Payload) < 2 {
				return ws.StatusNoStatusRcvd, ""
			}
			code, reason := ws.ParseCloseFrameData(f.Payload)
			return code, reason
		default:
			t.Fatalf("got %v, want a close frame", f)
		}
	}
}

// expectEOF checks that the peer closes the socket within ioTimeout.
func (c *rawClient) expectEOF(t testing.TB) {
	t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(ioTimeout))
	var buf [512]byte
	for {
		n, err := c.br.Read(buf[:])
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !isReset(err) {
				t.Fatalf("socket not closed by sluice: %v", err)
			}
			return
		}
		if n > 0 {
			t.Fatalf("got %d more bytes after the close frame: %q", n, buf[:n])
		}
	}
}

func isReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset")
}

func closePayload(code ws.StatusCode, reason string) []byte {
	return ws.NewCloseFrameBody(code, reason)
}
