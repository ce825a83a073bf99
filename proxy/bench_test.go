package proxy

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/url"
	"os"
	"runtime"
	"runtime/metrics"
	"runtime/pprof"
	"syscall"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/limiter"
)

// benchBackend is a raw gobwas/ws backend that hands each upgraded
// connection to the benchmark. Not wstest.ServeRaw: it keeps no goroutine
// or buffer per connection, so that BenchmarkIdleSessions weighs sluice.
type benchBackend struct {
	ln    net.Listener
	conns chan net.Conn
}

func newBenchBackend(tb testing.TB) *benchBackend {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	b := &benchBackend{ln: ln, conns: make(chan net.Conn, 4096)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(b.conns)
				return
			}
			if _, err := ws.Upgrade(c); err != nil {
				c.Close()
				continue
			}
			b.conns <- c
		}
	}()
	tb.Cleanup(func() { ln.Close() })
	return b
}

func startBenchProxy(tb testing.TB, backend string, opts Options) (string, *Server) {
	u, _ := url.Parse("ws://" + backend)
	opts.Upstream = u
	opts.Logger = zerolog.Nop()
	srv, err := New(opts)
	if err != nil {
		tb.Fatal(err)
	}
	addr, served := serveLoopback(tb, srv)
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-served
	})
	return addr, srv
}

// serveLoopback serves srv on a fresh 127.0.0.1 listener (wrapped for
// the PROXY protocol when srv's options ask for it, as serve.Run does)
// and returns its address and a channel closed when Serve has returned.
// Callers shut srv down in their own cleanup, with the checks their tests
// want.
func serveLoopback(tb testing.TB, srv *Server) (string, <-chan struct{}) {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	l := ln
	if srv.opts.ProxyProtocol {
		l = srv.ProxyProtocolListener(ln)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.Serve(l)
	}()
	return ln.Addr().String(), served
}

// dialRaw opens a client WebSocket as a bare net.Conn.
func dialRaw(tb testing.TB, addr string) (net.Conn, *bufio.Reader) {
	c, br, _, err := ws.Dial(context.Background(), "ws://"+addr+"/")
	if err != nil {
		tb.Fatal(err)
	}
	return c, br
}

// benchPair starts a backend and a proxy in front of it with opts, and
// connects one client through them. It returns the client's socket, a
// reader of what the client receives (the bytes buffered during the
// handshake first), and the backend's end; both sockets are closed when
// the benchmark ends.
func benchPair(b *testing.B, opts Options) (client net.Conn, fromProxy io.Reader, up net.Conn) {
	b.Helper()
	backend := newBenchBackend(b)
	addr, _ := startBenchProxy(b, backend.ln.Addr().String(), opts)
	client, br := dialRaw(b, addr)
	b.Cleanup(func() { client.Close() })
	up = <-backend.conns
	b.Cleanup(func() { up.Close() })
	fromProxy = client
	if br != nil {
		fromProxy = io.MultiReader(br, client)
	}
	return client, fromProxy, up
}

var frameSizes = []struct {
	name string
	n    int
}{{"128B", 128}, {"16KiB", 16 << 10}, {"1MiB", 1 << 20}}

// BenchmarkClientToUpstream measures the frame path from a client to the
// backend: allocations per frame are the whole process's (reader, writer,
// queue), divided by b.N.
func BenchmarkClientToUpstream(b *testing.B) {
	for _, size := range frameSizes {
		b.Run(size.name, func(b *testing.B) { benchClientToUpstream(b, size.n, Options{}) })
	}
	// With inbound limits on (too high to hold anything back): what the
	// checks cost a frame, and that they allocate nothing.
	limited := Options{
		ClientRate:                   RateLimit{MessagesPerSecond: 1e9, BytesPerSecond: 1 << 40},
		UpstreamMaxMessagesPerSecond: 1e9,
	}
	b.Run("128B-limited", func(b *testing.B) { benchClientToUpstream(b, 128, limited) })
}

func benchClientToUpstream(b *testing.B, n int, opts Options) {
	client, _, up := benchPair(b, opts)
	payload := make([]byte, n)
	wire := ws.MustCompileFrame(ws.MaskFrame(ws.NewBinaryFrame(payload)))
	want := int64(len(wire)) // masked frame in, masked frame out
	done := make(chan error, 1)
	b.SetBytes(int64(n))
	b.ReportAllocs()
	b.ResetTimer()
	go func() {
		_, err := io.CopyN(io.Discard, up, want*int64(b.N))
		done <- err
	}()
	for i := 0; i < b.N; i++ {
		if _, err := client.Write(wire); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
}

// BenchmarkUpstreamToClient measures the queued direction: backend frames
// through the client's queue and writer.
func BenchmarkUpstreamToClient(b *testing.B) {
	for _, size := range frameSizes {
		b.Run(size.name, func(b *testing.B) {
			// Pause: the backend writes in a tight loop, faster than any
			// client reads, and the benchmark measures the path, not a
			// policy.
			_, r, up := benchPair(b, Options{Queue: limiter.Config{Policy: limiter.Pause}})
			payload := make([]byte, size.n)
			wire := ws.MustCompileFrame(ws.NewBinaryFrame(payload))
			done := make(chan error, 1)
			b.SetBytes(int64(size.n))
			b.ReportAllocs()
			b.ResetTimer()
			go func() {
				_, err := io.CopyN(io.Discard, r, int64(len(wire))*int64(b.N))
				done <- err
			}()
			for i := 0; i < b.N; i++ {
				if _, err := up.Write(wire); err != nil {
					b.Fatal(err)
				}
			}
			if err := <-done; err != nil {
				b.Fatal(err)
			}
		})
	}
}

// BenchmarkIdleSessions opens 1,000 idle proxied sessions and reports the
// Go memory (heap in use + goroutine stacks) they add, per session. Run it
// with -benchtime=1x; the backend's and the clients' sockets live in the
// same process, so their share is measured without sluice and subtracted.
// Sub-benchmarks: readers parked in the epoll set (the default), and
// readers waiting in their goroutines (NoIdlePoll).
func BenchmarkIdleSessions(b *testing.B) {
	b.Run("epoll", func(b *testing.B) { benchIdleSessions(b, Options{}) })
	b.Run("goroutines", func(b *testing.B) { benchIdleSessions(b, Options{NoIdlePoll: true}) })
}

func benchIdleSessions(b *testing.B, opts Options) {
	const n = 1000
	heapProfile := os.Getenv("IDLE_HEAP_PROFILE")
	if heapProfile != "" {
		// Every allocation, not one per 512 KiB: the profile is read per
		// session.
		defer func(r int) { runtime.MemProfileRate = r }(runtime.MemProfileRate)
		runtime.MemProfileRate = 1
	}
	backend := newBenchBackend(b)
	addr, srv := startBenchProxy(b, backend.ln.Addr().String(), opts)
	base, baseStack := goMemoryParts()
	// Keep every conn referenced: a collected net.Conn is closed by its
	// finalizer.
	var clients, ups []net.Conn
	for i := 0; i < n; i++ {
		c, _ := dialRaw(b, addr)
		clients = append(clients, c)
		ups = append(ups, <-backend.conns)
	}
	waitSessions(b, srv, n)
	waitParked(b, srv, 2*n)
	withSessions, stackSessions := goMemoryParts()
	if heapProfile != "" {
		f, err := os.Create(heapProfile)
		if err != nil {
			b.Fatal(err)
		}
		err = pprof.Lookup("heap").WriteTo(f, 0)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	// The same number of raw client and backend conns without sluice, to
	// subtract the test's own share.
	direct := newBenchBackend(b)
	var raws []net.Conn
	for i := 0; i < n; i++ {
		c, _ := dialRaw(b, direct.ln.Addr().String())
		raws = append(raws, c, <-direct.conns)
	}
	withDirect, stackDirect := goMemoryParts()
	heapTest, stackTest := withDirect-withSessions, stackDirect-stackSessions
	b.ReportMetric(float64(withSessions-base-heapTest)/n, "heap-B/session")
	b.ReportMetric(float64(stackSessions-baseStack-stackTest)/n, "stack-B/session")
	b.ReportMetric(float64(srv.Sessions()), "sessions")
	b.ReportMetric(float64(runtime.NumGoroutine()), "goroutines")
	for _, c := range append(append(clients, ups...), raws...) {
		c.Close()
	}
}

// goMemoryParts is live heap objects and goroutine stacks, after a GC.
func goMemoryParts() (heap, stacks int64) {
	runtime.GC()
	runtime.GC()
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/memory/classes/heap/stacks:bytes"}}
	metrics.Read(s)
	return int64(s[0].Value.Uint64()), int64(s[1].Value.Uint64())
}

// BenchmarkRoundTrip sends one small message at a time through sluice to
// an echoing backend and back, waiting for each: every frame finds an
// empty socket, so with the epoll set (the default) each reader takes the
// quiet path (an empty read, then a wait under a deadline, well inside
// idleGrace) where goroutine readers simply wait. cpu-ns/op is the whole
// process's CPU time (client and backend included) per round trip,
// steadier than wall time on a shared machine.
func BenchmarkRoundTrip(b *testing.B) {
	for _, mode := range []struct {
		name string
		opts Options
	}{{"epoll", Options{}}, {"goroutines", Options{NoIdlePoll: true}}} {
		b.Run(mode.name, func(b *testing.B) {
			client, r, up := benchPair(b, mode.opts)
			payload := make([]byte, 128)
			in := ws.MustCompileFrame(ws.MaskFrame(ws.NewBinaryFrame(payload)))
			out := ws.MustCompileFrame(ws.NewBinaryFrame(payload))
			echoDone := make(chan error, 1)
			go func() {
				// The backend answers each masked frame with an unmasked one.
				buf := make([]byte, len(in))
				for {
					if _, err := io.ReadFull(up, buf); err != nil {
						echoDone <- nil
						return
					}
					if _, err := up.Write(out); err != nil {
						echoDone <- err
						return
					}
				}
			}()
			buf := make([]byte, len(out))
			b.ReportAllocs()
			cpu0 := processCPU()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := client.Write(in); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(r, buf); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(processCPU()-cpu0)/float64(b.N), "cpu-ns/op")
			up.Close()
			if err := <-echoDone; err != nil {
				b.Fatal(err)
			}
		})
	}
}

// processCPU is the process's user and system CPU time so far, in ns.
func processCPU() int64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return ru.Utime.Nano() + ru.Stime.Nano()
}
