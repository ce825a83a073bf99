package wstest

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gobwas/ws"
)

// Client speaks WebSocket frame by frame over a plain socket, so a test
// controls fragmentation, masking and protocol violations exactly.
type Client struct {
	Conn net.Conn
	BR   *bufio.Reader // what the server sent, the bytes after the 101 first
	Resp *http.Response
}

// Request is an upgrade request as Upgrade writes it by hand.
type Request struct {
	Path string // "/" when empty
	// Header lines ("Name: value"), written as given; a Connection line
	// replaces the default "Connection: Upgrade".
	Header []string
	// Pipelined bytes go in the same write as the request.
	Pipelined []byte
	// LocalIP is the address to dial from (127.0.0.1 when empty).
	LocalIP string
	// RecvBuffer, if not 0, is SO_RCVBUF, set before connect so that the
	// window the client offers stays that small: a slow reader.
	RecvBuffer int
}

// SmallWindow returns a net.Dialer Control that sets SO_RCVBUF to n before
// connect, for clients dialled through a library.
func SmallWindow(n int) func(network, address string, rc syscall.RawConn) error {
	return func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, n)
		}); err != nil {
			return err
		}
		return serr
	}
}

// Dial upgrades a connection to addr with a hand-written request for path
// and the extra header lines, and wants a 101 with the right
// Sec-WebSocket-Accept; the cleanup closes the socket.
func Dial(t testing.TB, addr, path string, extra []string, pipelined []byte) *Client {
	t.Helper()
	c, resp, body := Upgrade(t, addr, Request{Path: path, Header: extra, Pipelined: pipelined})
	if c == nil {
		t.Fatalf("upgrade answered %s: %q", resp.Status, body)
	}
	return c
}

// Upgrade writes req to addr and reads the answer. For a 101 it checks
// Sec-WebSocket-Accept and returns the client, closed when the test ends;
// otherwise the response with (up to 1 KiB of) its body, and the socket
// closed.
func Upgrade(t testing.TB, addr string, req Request) (c *Client, resp *http.Response, body string) {
	t.Helper()
	d := net.Dialer{Timeout: IOTimeout}
	if req.LocalIP != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(req.LocalIP)}
	}
	if req.RecvBuffer > 0 {
		d.Control = SmallWindow(req.RecvBuffer)
	}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	path := req.Path
	if path == "" {
		path = "/"
	}
	key := NewKey()
	var b bytes.Buffer
	fmt.Fprintf(&b, "GET %s HTTP/1.1\r\nHost: %s\r\n", path, addr)
	hasConnection := false
	for _, l := range req.Header {
		if strings.HasPrefix(strings.ToLower(l), "connection:") {
			hasConnection = true
		}
		b.WriteString(l + "\r\n")
	}
	if !hasConnection {
		b.WriteString("Connection: Upgrade\r\n")
	}
	fmt.Fprintf(&b, "Upgrade: websocket\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n", key)
	b.Write(req.Pipelined)
	conn.SetDeadline(time.Now().Add(IOTimeout))
	if _, err := conn.Write(b.Bytes()); err != nil {
		t.Fatalf("write upgrade request: %v", err)
	}
	br := bufio.NewReader(conn)
	resp, err = http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("read upgrade response: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		all, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		conn.Close()
		return nil, resp, string(all)
	}
	if got, want := resp.Header.Get("Sec-Websocket-Accept"), AcceptKey(key); got != want {
		t.Fatalf("Sec-WebSocket-Accept = %q, want %q", got, want)
	}
	conn.SetDeadline(time.Time{})
	return &Client{Conn: conn, BR: br, Resp: resp}, resp, ""
}

// NewKey is a fresh Sec-WebSocket-Key.
func NewKey() string {
	var b [16]byte
	rand.Read(b[:])
	return base64.StdEncoding.EncodeToString(b[:])
}

// AcceptKey is the Sec-WebSocket-Accept that answers key.
func AcceptKey(key string) string {
	h := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	return base64.StdEncoding.EncodeToString(h[:])
}

// Write sends frames in one write within IOTimeout.
func (c *Client) Write(t testing.TB, frames ...Frame) {
	t.Helper()
	var b []byte
	for _, f := range frames {
		b = append(b, Encode(f)...)
	}
	c.Conn.SetWriteDeadline(time.Now().Add(IOTimeout))
	if _, err := c.Conn.Write(b); err != nil {
		t.Fatalf("raw write: %v", err)
	}
}

// Read reads one frame within IOTimeout.
func (c *Client) Read(t testing.TB) Frame {
	t.Helper()
	c.Conn.SetReadDeadline(time.Now().Add(IOTimeout))
	f, err := ReadFrame(c.BR)
	if err != nil {
		t.Fatalf("raw read: %v", err)
	}
	return f
}

// ReadClose reads frames until a close frame and returns its code and
// reason; pings and pongs are skipped, a data frame or a masked close
// fails the test.
func (c *Client) ReadClose(t testing.TB) (ws.StatusCode, string) {
	t.Helper()
	for {
		f := c.Read(t)
		switch f.Op {
		case ws.OpPing, ws.OpPong:
			continue
		case ws.OpClose:
			if f.Masked {
				t.Errorf("close frame from the server is masked")
			}
			return CloseOf(f)
		default:
			t.Fatalf("got %v, want a close frame", f)
		}
	}
}

// ExpectEOF checks that the server closes the socket within IOTimeout and
// sends nothing more.
func (c *Client) ExpectEOF(t testing.TB) {
	t.Helper()
	c.Conn.SetReadDeadline(time.Now().Add(IOTimeout))
	var buf [512]byte
	for {
		n, err := c.BR.Read(buf[:])
		if err != nil {
			if !IsEnd(err) {
				t.Fatalf("socket not closed by the server: %v", err)
			}
			return
		}
		if n > 0 {
			t.Fatalf("got %d more bytes after the close frame: %q", n, buf[:n])
		}
	}
}
