package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/rs/zerolog"
)

// TestShutdownHandshakes: Shutdown refuses a handshake whose request
// arrives during the drain with 503, waits for it, and when its context
// ends cuts off one that never finishes its request; Serve then returns
// http.ErrServerClosed.
func TestShutdownHandshakes(t *testing.T) {
	b := newGorillaBackend(t)
	u, _ := url.Parse("ws" + strings.TrimPrefix(b.URL, "http"))
	srv, err := New(Options{Upstream: u, Logger: zerolog.Nop(), HandshakeTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	dial := func(part string) net.Conn {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, part)
		return c
	}
	const head = "GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
	late := dial(head)  // finishes its request during the drain
	stuck := dial(head) // never does
	for srv.handshakesNow() < 2 {
		time.Sleep(time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(ctx) }()
	for !srv.closing.Load() {
		time.Sleep(time.Millisecond)
	}
	io.WriteString(late, "Sec-WebSocket-Version: 13\r\n\r\n")
	res, err := http.ReadResponse(bufio.NewReader(late), nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.StatusCode != http.StatusServiceUnavailable || res.Header.Get("Retry-After") == "" {
		t.Errorf("during the drain: %s, Retry-After %q; want 503 with Retry-After", res.Status, res.Header.Get("Retry-After"))
	}
	began := time.Now()
	if err := <-shut; !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown = %v, want the context's deadline", err)
	}
	if d := time.Since(began); d > 2*time.Second {
		t.Errorf("Shutdown took %v past its context", d)
	}
	if _, err := stuck.Read(make([]byte, 1)); err == nil {
		t.Error("the unfinished handshake was not cut off")
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("Serve = %v, want http.ErrServerClosed", err)
	}
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("Serve after Shutdown = %v, want http.ErrServerClosed", err)
	}
}

// TestServeHTTPEmbedded: the Server still works as a handler of an
// http.Server, and keeps the bytes pipelined behind the request.
func TestServeHTTPEmbedded(t *testing.T) {
	b := newGorillaBackend(t)
	u, _ := url.Parse("ws" + strings.TrimPrefix(b.URL, "http"))
	srv, err := New(Options{Upstream: u, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown(context.Background())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: srv}
	go hs.Serve(ln)
	defer hs.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var req bytes.Buffer
	req.WriteString("GET /x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	f := ws.MaskFrame(ws.NewTextFrame([]byte("pipelined")))
	if err := ws.WriteFrame(&req, f); err != nil {
		t.Fatal(err)
	}
	c.Write(req.Bytes()) // the frame in the request's segment
	br := bufio.NewReader(c)
	res, err := http.ReadResponse(br, nil)
	if err != nil || res.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v, %v", res, err)
	}
	if got := res.Header.Get("Sec-Websocket-Accept"); got != "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" {
		t.Errorf("Sec-WebSocket-Accept %q", got)
	}
	h, err := ws.ReadHeader(br)
	if err != nil || h.Length != int64(len("pipelined")) {
		t.Fatalf("echo header %+v, %v; want the pipelined frame's", h, err)
	}
	echo := make([]byte, h.Length)
	if _, err := io.ReadFull(br, echo); err != nil || string(echo) != "pipelined" {
		t.Fatalf("echo %q, %v; want the pipelined frame", echo, err)
	}
}

// handshakesNow is the number of handshakes under way.
func (s *Server) handshakesNow() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.handshakes)
}
