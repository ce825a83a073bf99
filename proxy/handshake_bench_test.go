package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/url"
	"runtime/metrics"
	"strings"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/keepalive"
)

// handshakeRequest is what the load harness's gorilla client sends.
const handshakeRequest = "GET / HTTP/1.1\r\n" +
	"Host: %s\r\n" +
	"User-Agent: Go-http-client/1.1\r\n" +
	"Connection: Upgrade\r\n" +
	"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" +
	"Sec-WebSocket-Version: 13\r\n" +
	"Upgrade: websocket\r\n\r\n"

// closeBackend is a raw gobwas/ws backend that upgrades, echoes the
// client's close frame and hangs up: the least work a backend can do for
// one upgrade, so that the proxy's share stands out (wstest.ServeRaw
// tracks and buffers every connection, which BenchmarkHandshake would count).
func closeBackend(tb testing.TB) string {
	ln, err := noKeepalive.Listen(tb.Context(), "tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go echoClose(c)
		}
	}()
	return ln.Addr().String()
}

func echoClose(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := ws.Upgrade(c); err != nil {
		return
	}
	var buf [ws.MaxHeaderSize + ws.MaxControlFramePayloadSize]byte
	for {
		h, err := ws.ReadHeader(c)
		if err != nil || h.Length > ws.MaxControlFramePayloadSize {
			return
		}
		p := buf[:h.Length]
		if _, err := io.ReadFull(c, p); err != nil {
			return
		}
		if h.OpCode != ws.OpClose {
			continue
		}
		if h.Masked {
			ws.Cipher(p, h.Mask, 0)
		}
		ws.WriteFrame(c, ws.NewCloseFrame(p))
		return
	}
}

// handshakeClient does what one harness handshake does: connect, upgrade,
// send close 1000 and wait for the reply, hang up.
type handshakeClient struct {
	addr    string
	request []byte
	close   []byte
	buf     []byte
}

func newHandshakeClient(addr string) *handshakeClient {
	return &handshakeClient{
		addr:    addr,
		request: []byte(strings.Replace(handshakeRequest, "%s", addr, 1)),
		close:   ws.MustCompileFrame(ws.MaskFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(ws.StatusNormalClosure, "")))),
		buf:     make([]byte, 4096),
	}
}

// Like main.go's listener, without TCP keepalive: its setsockopt calls
// would be counted against every handshake. Clients do without it too.
var (
	noKeepalive       = net.ListenConfig{KeepAlive: -1}
	noKeepaliveDialer = net.Dialer{KeepAlive: -1}
)

var errNoUpgrade = errors.New("no 101")

func (h *handshakeClient) once() error {
	c, err := noKeepaliveDialer.Dial("tcp", h.addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(h.request); err != nil {
		return err
	}
	// Read the 101's head, then the close frame behind it: 2 header
	// bytes and the 2-byte code.
	n, end := 0, -1
	for end < 0 {
		m, err := c.Read(h.buf[n:])
		if err != nil {
			return err
		}
		n += m
		end = bytes.Index(h.buf[:n], []byte("\r\n\r\n"))
		if end < 0 && n == len(h.buf) {
			return errNoUpgrade
		}
	}
	if !bytes.HasPrefix(h.buf, []byte("HTTP/1.1 101 ")) {
		return errNoUpgrade
	}
	if _, err := c.Write(h.close); err != nil {
		return err
	}
	have := n - (end + 4)
	if have < 4 {
		if _, err := io.ReadAtLeast(c, h.buf[n:], 4-have); err != nil {
			return err
		}
	}
	return nil
}

// benchHandshakeOptions are sluice's configuration defaults that touch an
// upgrade (config.go).
func benchHandshakeOptions() Options {
	return Options{
		Registerer:         prometheus.NewRegistry(),
		MaxFrameBytes:      16 << 20,
		MaxMessageBytes:    16 << 20,
		UpstreamReadBuffer: 64 << 10,
		FrameReadTimeout:   30 * time.Second,
		MaxConnections:     50000,
		Keepalive:          keepalive.Config{Interval: 25 * time.Second, Timeout: 10 * time.Second},
		HTTPPassThrough:    true,
	}
}

// BenchmarkHandshake is the load harness's handshakes mode in one process:
// connect, upgrade (the upstream dial included), close 1000 with its
// reply. "direct" is the client and backend alone, so that sluice's cost
// is the difference; allocations are the whole process's.
func BenchmarkHandshake(b *testing.B) {
	backend := closeBackend(b)
	b.Run("direct", func(b *testing.B) {
		benchHandshakes(b, backend)
	})
	b.Run("sluice", func(b *testing.B) {
		opts := benchHandshakeOptions()
		u, _ := url.Parse("ws://" + backend + "/")
		opts.Upstream = u
		opts.Logger = zerolog.Nop()
		srv, err := New(opts)
		if err != nil {
			b.Fatal(err)
		}
		ln, err := noKeepalive.Listen(b.Context(), "tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		served := make(chan struct{})
		go func() {
			defer close(served)
			srv.Serve(ln)
		}()
		defer func() {
			srv.Shutdown(context.Background())
			<-served
		}()
		addr := ln.Addr().String()
		benchHandshakes(b, addr)
	})
}

func benchHandshakes(b *testing.B, addr string) {
	b.ReportAllocs()
	// Goroutines started per upgrade, client's and backend's included (as
	// in "direct"): each is a hand-off the scheduler pays for.
	created := []metrics.Sample{{Name: "/sched/goroutines-created:goroutines"}}
	metrics.Read(created)
	before := created[0].Value.Uint64()
	defer func() {
		metrics.Read(created)
		b.ReportMetric(float64(created[0].Value.Uint64()-before)/float64(b.N), "goroutines/op")
	}()
	// Enough clients at once to keep both the proxy's CPUs busy, as the
	// harness's 16 workers do.
	b.SetParallelism(8)
	b.RunParallel(func(pb *testing.PB) {
		c := newHandshakeClient(addr)
		for pb.Next() {
			if err := c.once(); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
