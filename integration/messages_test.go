package integration

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/gobwas/ws"
	gorilla "github.com/gorilla/websocket"

	"github.com/sluice-proxy/sluice/internal/wstest"
	"github.com/sluice-proxy/sluice/proxy"
)

// largeLimits lets clients send up to 64 MiB messages through sluice. The
// default WriteTimeout stays: it bounds a stall, not the time a large
// frame takes to cross (a backend slowed down by the race detector reads
// 64 MiB in well over 10s).
func largeLimits(o *proxy.Options) {
	o.MaxMessageBytes = 64 << 20
	o.MaxFrameBytes = 64 << 20
}

// payload returns n bytes: printable ASCII for text, random for binary. A
// random block of a prime length is tiled, so that no frame or buffer
// boundary lines up with the pattern and large payloads stay cheap to make
// under the race detector.
func payload(n int, text bool) []byte {
	const block = 65521
	seed := make([]byte, min(n, block))
	r := rand.NewChaCha8([32]byte{byte(n), byte(n >> 8), byte(n >> 16)})
	r.Read(seed)
	if text {
		for i := range seed {
			seed[i] = 'a' + seed[i]%26
		}
	}
	b := make([]byte, n)
	for i := 0; i < n; i += copy(b[i:], seed) {
	}
	return b
}

// TestEchoSizes sends messages around every frame-length encoding boundary
// (7-bit, 16-bit, 64-bit lengths), and 16 MiB, through sluice to an echo
// backend and expects each back byte for byte with its type.
func TestEchoSizes(t *testing.T) {
	b := newBackend(t)
	s := startSluice(t, b.url, largeLimits)
	// 16 MiB costs seconds under the race detector: each client sends it
	// once, gorilla as text (in 4 KiB frames) and coder as binary (in one
	// frame, which sluice splices).
	sizes := []int{0, 125, 126, 65535, 65536, 1 << 20}

	t.Run("gorilla", func(t *testing.T) {
		c, _ := dialGorilla(t, s.url+"/echo", nil)
		for _, n := range sizes {
			for _, typ := range []int{gorilla.TextMessage, gorilla.BinaryMessage} {
				if err := gorillaEcho(c, typ, payload(n, typ == gorilla.TextMessage)); err != nil {
					t.Errorf("%d bytes, type %d: %v", n, typ, err)
				}
			}
		}
		if err := gorillaEcho(c, gorilla.TextMessage, payload(16<<20, true)); err != nil {
			t.Errorf("16 MiB text: %v", err)
		}
	})
	t.Run("coder", func(t *testing.T) {
		c := dialCoder(t, s.url+"/echo", nil)
		c.SetReadLimit(64 << 20)
		for _, n := range sizes {
			for _, typ := range []websocket.MessageType{websocket.MessageText, websocket.MessageBinary} {
				if err := coderEcho(c, typ, payload(n, typ == websocket.MessageText)); err != nil {
					t.Errorf("%d bytes, %v: %v", n, typ, err)
				}
			}
		}
		if err := coderEcho(c, websocket.MessageBinary, payload(16<<20, false)); err != nil {
			t.Errorf("16 MiB binary: %v", err)
		}
	})
}

// TestEcho64MiB sends one 64 MiB binary message, the largest the options
// allow, and expects it back intact.
func TestEcho64MiB(t *testing.T) {
	if testing.Short() {
		t.Skip("64 MiB echo skipped in -short mode")
	}
	b := newBackend(t)
	s := startSluice(t, b.url, largeLimits)
	c := dialCoder(t, s.url+"/echo", nil)
	c.SetReadLimit(64 << 20)
	if err := coderEcho(c, websocket.MessageBinary, payload(64<<20, false)); err != nil {
		t.Fatal(err)
	}
}

// TestFragmentationPreserved checks that sluice forwards frames as they
// came (RFC 6455 §5.4): a fragmented message with a ping between its
// fragments reaches the backend as the same frames in the same order, and
// the backend's identical reply reaches the client the same way. One
// fragment is large enough to take sluice's streaming path.
func TestFragmentationPreserved(t *testing.T) {
	b := newBackend(t)
	s := startSluice(t, b.url, nil)
	id := newID()
	c := wstest.Dial(t, s.addr, "/frames?id="+id, nil, nil)
	uc := b.waitConn(t, id)

	big := payload(300<<10, true)
	sequence := []wstest.Frame{
		{Fin: false, Op: ws.OpText, Masked: true, Payload: []byte("frag-1")},
		{Fin: true, Op: ws.OpPing, Masked: true, Payload: []byte("between")},
		{Fin: false, Op: ws.OpContinuation, Masked: true, Payload: []byte("frag-2")},
		{Fin: false, Op: ws.OpContinuation, Masked: true, Payload: big},
		{Fin: true, Op: ws.OpContinuation, Masked: true, Payload: []byte("")},
		{Fin: true, Op: ws.OpBinary, Masked: true, Payload: []byte{0, 1, 2}},
	}
	// Lock step: each frame is seen by the backend and echoed to the
	// client before the next is sent, so the order of frames is fixed and
	// any change to a frame shows.
	for i, want := range sequence {
		c.Write(t, want)
		got := recv(t, uc.frames, fmt.Sprintf("frame %d at the backend", i))
		if !sameFrame(got, want) || !got.Masked {
			t.Fatalf("frame %d at the backend = %v, want %v (masked)", i, got, want)
		}
		echo := c.Read(t)
		want.Masked = false
		if !sameFrame(echo, want) || echo.Masked {
			t.Fatalf("frame %d at the client = %v, want %v (unmasked)", i, echo, want)
		}
	}
	c.Write(t, wstest.Frame{Fin: true, Op: ws.OpClose, Masked: true, Payload: closePayload(ws.StatusNormalClosure, "done")})
	if code, _ := c.ReadClose(t); code != ws.StatusNormalClosure {
		t.Errorf("client got close %d, want 1000", code)
	}
	if got := b.ended(t, id); got.code != 1000 || got.text != "done" || got.err != nil {
		t.Errorf("backend saw %v, want 1000 \"done\"", got)
	}
}

func sameFrame(a, b wstest.Frame) bool {
	return a.Fin == b.Fin && a.Rsv == b.Rsv && a.Op == b.Op && string(a.Payload) == string(b.Payload)
}

// TestUpstreamFirstMessageNotLost: a backend that writes right after its
// 101 (often in the same TCP segment) must not lose that message in
// sluice's handshake read-ahead. Repeated to catch races.
func TestUpstreamFirstMessageNotLost(t *testing.T) {
	b := newBackend(t)
	s := startSluice(t, b.url, nil)
	for i := range 50 {
		coalesce := i%2 == 1
		path := "/hello"
		want := []string{"hello"}
		if coalesce {
			path += "?coalesce=1"
			want = []string{"hello 1", "hello 2"}
		}
		if i%4 < 2 {
			c, _ := dialGorilla(t, s.url+path, nil)
			for _, w := range want {
				c.SetReadDeadline(time.Now().Add(wstest.IOTimeout))
				_, got, err := c.ReadMessage()
				if err != nil || string(got) != w {
					t.Fatalf("round %d (gorilla, %s): got %q, %v; want %q", i, path, got, err, w)
				}
			}
			c.WriteControl(gorilla.CloseMessage, gorilla.FormatCloseMessage(1000, ""), time.Now().Add(wstest.IOTimeout))
			if ce := gorillaReadClose(t, c); ce.Code != 1000 {
				t.Fatalf("round %d: close %d, want 1000", i, ce.Code)
			}
		} else {
			c := dialCoder(t, s.url+path, nil)
			ctx, cancel := context.WithTimeout(context.Background(), wstest.IOTimeout)
			for _, w := range want {
				_, got, err := c.Read(ctx)
				if err != nil || string(got) != w {
					cancel()
					t.Fatalf("round %d (coder, %s): got %q, %v; want %q", i, path, got, err, w)
				}
			}
			cancel()
			if err := c.Close(websocket.StatusNormalClosure, ""); err != nil {
				t.Fatalf("round %d: close: %v", i, err)
			}
		}
	}
}

// TestClientFrameBehindUpgradeRequest: a client that pipelines its first
// frame behind the upgrade request (in the same write) must have it
// forwarded, not lost in the HTTP server's read buffer.
func TestClientFrameBehindUpgradeRequest(t *testing.T) {
	b := newBackend(t)
	s := startSluice(t, b.url, nil)
	first := wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpText, Masked: true, Payload: []byte("pipelined")})
	c := wstest.Dial(t, s.addr, "/echo", nil, first)
	if f := c.Read(t); f.Op != ws.OpText || string(f.Payload) != "pipelined" {
		t.Fatalf("echo = %v, want text \"pipelined\"", f)
	}
	c.Write(t, wstest.Frame{Fin: true, Op: ws.OpText, Masked: true, Payload: []byte(strings.Repeat("x", 300))})
	if f := c.Read(t); len(f.Payload) != 300 {
		t.Fatalf("second echo = %v", f)
	}
}
