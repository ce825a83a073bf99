package integration

// Helpers of the keepalive (ka) and process (proc) tests. The in-process
// sluice, the waits and the test log come from the shared harness
// (harness_test.go); what is here is particular to these tests.

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	gorilla "github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluice-proxy/sluice/internal/wstest"
	"github.com/sluice-proxy/sluice/proxy"
)

// --- gorilla backend ----------------------------------------------------------

// kaLegEnd is how one backend connection ended: the close code the backend
// read (-1 when the socket ended without a close frame) and its text.
type kaLegEnd struct {
	Code int
	Text string
	At   time.Time
}

func (e kaLegEnd) String() string { return fmt.Sprintf("%d %q", e.Code, e.Text) }

// kaLegEndOf classifies the error that ended a gorilla read loop.
func kaLegEndOf(err error) kaLegEnd {
	var ce *gorilla.CloseError
	if errors.As(err, &ce) {
		return kaLegEnd{Code: ce.Code, Text: ce.Text, At: time.Now()}
	}
	return kaLegEnd{Code: -1, Text: fmt.Sprint(err), At: time.Now()}
}

// kaBackend is a gorilla/websocket backend on 127.0.0.1:0. Each connection
// is served by serve (an echo by default) on its handler goroutine; the
// cleanup closes every connection and waits for every handler.
type kaBackend struct {
	URL  string         // ws://host:port
	Ends chan kaLegEnd  // one per connection that ended, for echo backends
	Conn chan *kaBConn  // one per accepted connection
	srv  *http.Server   // accepts upgrades
	wg   sync.WaitGroup // one per handler past the closed check

	mu     sync.Mutex
	conns  map[*gorilla.Conn]struct{} // guarded by mu
	closed bool                       // guarded by mu
}

// kaBConn is one backend connection as a test sees it.
type kaBConn struct {
	*gorilla.Conn
	Ended chan kaLegEnd // receives how the connection ended, once
}

// kaStartBackend starts a backend; serve, if not nil, replaces the echo
// loop. serve must return once the connection fails.
func kaStartBackend(t testing.TB, serve func(c *kaBConn)) *kaBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("backend listen: %v", err)
	}
	b := &kaBackend{
		URL:   "ws://" + ln.Addr().String(),
		Ends:  make(chan kaLegEnd, 1024),
		Conn:  make(chan *kaBConn, 1024),
		conns: make(map[*gorilla.Conn]struct{}),
	}
	if serve == nil {
		serve = kaEcho
	}
	up := gorilla.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}
	b.srv = &http.Server{
		ReadHeaderTimeout: wstest.IOTimeout,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			b.mu.Lock()
			if b.closed {
				b.mu.Unlock()
				http.Error(w, "closing", http.StatusServiceUnavailable)
				return
			}
			b.wg.Add(1)
			b.mu.Unlock()
			defer b.wg.Done()
			c, err := up.Upgrade(w, r, nil)
			if err != nil {
				return
			}
			b.mu.Lock()
			if b.closed {
				b.mu.Unlock()
				c.Close()
				return
			}
			b.conns[c] = struct{}{}
			b.mu.Unlock()
			bc := &kaBConn{Conn: c, Ended: make(chan kaLegEnd, 1)}
			nonBlockingSend(b.Conn, bc)
			serve(bc)
			c.Close()
			b.mu.Lock()
			delete(b.conns, c)
			b.mu.Unlock()
			select {
			case e := <-bc.Ended:
				bc.Ended <- e
				nonBlockingSend(b.Ends, e)
			default:
			}
		}),
	}
	go b.srv.Serve(ln)
	t.Cleanup(b.close)
	return b
}

func (b *kaBackend) close() {
	b.srv.Close()
	b.mu.Lock()
	b.closed = true
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// kaEcho echoes every message and records how the connection ended.
func kaEcho(c *kaBConn) {
	for {
		typ, msg, err := c.ReadMessage()
		if err != nil {
			c.Ended <- kaLegEndOf(err)
			return
		}
		c.SetWriteDeadline(time.Now().Add(wstest.IOTimeout))
		if err := c.WriteMessage(typ, msg); err != nil {
			c.Ended <- kaLegEndOf(err)
			return
		}
	}
}

// --- in-process sluice ----------------------------------------------------------

// kaSluice is one in-process sluice Server on 127.0.0.1:0.
type kaSluice struct {
	Srv  *proxy.Server
	Addr string // host:port
	URL  string // ws://host:port
	Reg  *prometheus.Registry
}

// kaStartSluice starts sluice with startSluice, keeping the registry its
// metrics go to so that Metric can read them; configure, if not nil,
// adjusts the options. The cleanup shuts it down and checks that no session
// is left.
func kaStartSluice(t testing.TB, upstream string, configure func(*proxy.Options)) *kaSluice {
	t.Helper()
	reg := prometheus.NewRegistry()
	s := startSluice(t, upstream, func(o *proxy.Options) {
		o.Registerer = reg
		if configure != nil {
			configure(o)
		}
	})
	return &kaSluice{Srv: s.srv, Addr: s.addr, URL: s.url, Reg: reg}
}

// Metric sums the samples of the counter or gauge name whose labels include
// every pair of labels.
func (s *kaSluice) Metric(t testing.TB, name string, labels map[string]string) float64 {
	t.Helper()
	var pairs []string
	for k, v := range labels {
		pairs = append(pairs, k, v)
	}
	v, _ := wstest.Metric(t, s.Reg, name, pairs...)
	return v
}

// MetricSoon polls Metric for up to a second until it reaches want, and
// returns the last value read.
func (s *kaSluice) MetricSoon(t testing.TB, name string, labels map[string]string, want float64) float64 {
	t.Helper()
	deadline := time.Now().Add(time.Second)
	for {
		v := s.Metric(t, name, labels)
		if v >= want || time.Now().After(deadline) {
			return v
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// --- idle-timeout middlebox -------------------------------------------------------

// kaRelay is a TCP relay that behaves like a load balancer with an idle
// timeout: it forwards bytes both ways and, once neither direction has
// carried a byte for idle, closes both sockets without a close frame.
// Unlike nginx's proxy_read_timeout it counts traffic in either direction.
type kaRelay struct {
	Addr     string
	target   string
	idle     time.Duration
	ln       net.Listener
	IdleCuts atomic.Int64 // pairs closed for idleness

	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  map[net.Conn]struct{} // guarded by mu
	closed bool                  // guarded by mu
}

func kaStartRelay(t testing.TB, target string, idle time.Duration) *kaRelay {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("relay listen: %v", err)
	}
	r := &kaRelay{Addr: ln.Addr().String(), target: target, idle: idle, ln: ln, conns: make(map[net.Conn]struct{})}
	r.wg.Add(1)
	go r.relayAcceptor()
	t.Cleanup(r.close)
	return r
}

func (r *kaRelay) close() {
	r.ln.Close()
	r.mu.Lock()
	r.closed = true
	for c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// track registers c for the cleanup; false when the relay is closing.
func (r *kaRelay) track(cs ...net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return false
	}
	for _, c := range cs {
		r.conns[c] = struct{}{}
	}
	return true
}

func (r *kaRelay) relayAcceptor() {
	defer r.wg.Done()
	for {
		down, err := r.ln.Accept()
		if err != nil {
			return
		}
		up, err := net.DialTimeout("tcp", r.target, wstest.IOTimeout)
		if err != nil {
			down.Close()
			continue
		}
		if !r.track(down, up) {
			down.Close()
			up.Close()
			return
		}
		var last atomic.Int64 // unix nanos of the last byte either way
		last.Store(time.Now().UnixNano())
		var once sync.Once
		cut := func(idle bool) {
			once.Do(func() {
				if idle {
					r.IdleCuts.Add(1)
				}
				down.Close()
				up.Close()
			})
		}
		r.wg.Add(2)
		go r.relayCopier(up, down, &last, cut)
		go r.relayCopier(down, up, &last, cut)
	}
}

// relayCopier copies src to dst. Its read deadline is always idle after the
// last byte seen in either direction; when it expires with no byte since,
// the pair is cut.
func (r *kaRelay) relayCopier(dst, src net.Conn, last *atomic.Int64, cut func(idle bool)) {
	defer r.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		src.SetReadDeadline(time.Unix(0, last.Load()).Add(r.idle))
		n, err := src.Read(buf)
		if n > 0 {
			last.Store(time.Now().UnixNano())
			if _, werr := dst.Write(buf[:n]); werr != nil {
				cut(false)
				return
			}
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				if time.Since(time.Unix(0, last.Load())) < r.idle {
					continue // the other direction was busy
				}
				cut(true)
				return
			}
			cut(false)
			return
		}
	}
}

// --- a backend that goes deaf after the upgrade ---------------------------------

// kaStartDeafBackend starts a backend that completes the upgrade and then
// reads nothing and writes nothing: a hung backend. Each upgraded
// connection goes to conns, for the test to inspect, and stays open until
// the test ends.
func kaStartDeafBackend(t testing.TB) (url string, conns <-chan net.Conn) {
	t.Helper()
	ch := make(chan net.Conn, 16)
	b := wstest.ServeRaw(t, wstest.RawOptions{}, func(c *wstest.RawConn) {
		nonBlockingSend(ch, net.Conn(c))
		<-t.Context().Done()
	})
	return "ws://" + b.Addr, ch
}

// kaMaxFrame bounds the payload the keepalive tests read: the keepalive tests
// see pings, pongs, closes and short messages only.
const kaMaxFrame = 1 << 20

// kaReader returns the reader a gobwas client must read from: the bytes
// buffered during the handshake first, if any.
func kaReader(c net.Conn, br *bufio.Reader) io.Reader {
	if br == nil {
		return c
	}
	return io.MultiReader(br, c)
}

// kaCountPrefix counts payloads that start with prefix.
func kaCountPrefix(payloads []string, prefix string) int {
	n := 0
	for _, p := range payloads {
		if strings.HasPrefix(p, prefix) {
			n++
		}
	}
	return n
}

// kaClosedPort returns a 127.0.0.1 address nothing listens on: a port the
// kernel just handed out and that was closed again.
func kaClosedPort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}
