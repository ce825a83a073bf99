package proxy

import (
	"bufio"
	"bytes"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/pires/go-proxyproto"

	"github.com/sluice-proxy/sluice/internal/wstest"
)

// TestProxyProtocolSessionOwnsSocket: beneath a PROXY header, the session
// reads and writes the TCP socket itself, so it gets what only a
// descriptor gives (Reader.Serve and epoll parking, writev from the
// reader, the unsent-bytes count, the socket buffer sizes). The header,
// the request and a first frame come in one write, so the header's reader
// buffers request bytes past the header: they must all arrive.
func TestProxyProtocolSessionOwnsSocket(t *testing.T) {
	backend := newBenchBackend(t)
	addr, srv := startBenchProxy(t, backend.ln.Addr().String(), Options{ProxyProtocol: true, ClientWriteBuffer: 64 << 10})

	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	header, err := proxyproto.HeaderProxyFromAddrs(1,
		&net.TCPAddr{IP: net.IPv4(203, 0, 113, 7), Port: 4000},
		&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 80}).Format()
	if err != nil {
		t.Fatal(err)
	}
	first := []byte("a first frame, in the header's packet")
	var out bytes.Buffer
	out.Write(header)
	out.WriteString("GET / HTTP/1.1\r\nHost: sluice\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	out.Write(ws.MustCompileFrame(ws.MaskFrame(ws.NewTextFrame(first))))
	if _, err := c.Write(out.Bytes()); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade after a PROXY header: %v %v", resp, err)
	}
	up := <-backend.conns
	up.SetDeadline(time.Now().Add(10 * time.Second))
	f, err := wstest.ReadFrame(up)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(f.Payload, first) {
		t.Fatalf("the backend got %q, want %q", f.Payload, first)
	}
	reply := []byte("and back")
	if _, err := up.Write(ws.MustCompileFrame(ws.NewTextFrame(reply))); err != nil {
		t.Fatal(err)
	}
	if f, err = wstest.ReadFrame(br); err != nil || !bytes.Equal(f.Payload, reply) {
		t.Fatalf("the client got %q, %v; want %q", f.Payload, err, reply)
	}

	srv.mu.Lock()
	defer srv.mu.Unlock()
	if len(srv.sessions) != 1 {
		t.Fatalf("%d sessions, want 1", len(srv.sessions))
	}
	for ss := range srv.sessions {
		if _, ok := ss.client.w.conn.(*net.TCPConn); !ok {
			t.Errorf("the session's client connection is a %T, want the *net.TCPConn beneath the PROXY header", ss.client.w.conn)
		}
		if ss.client.rd.RawConn() == nil {
			t.Error("the session's client reader has no descriptor")
		}
	}
}
