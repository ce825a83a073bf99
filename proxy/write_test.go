package proxy

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"go.uber.org/goleak"

	"github.com/sluice-proxy/sluice/limiter"
)

// TestFlushCarriesPartialWrites fills a client's socket so that the
// upstream reader's non-blocking writes (flush) stop part way through
// frames, and the writer goroutine that carries each batch on must start
// at the byte where the last write stopped: the client, once it reads,
// gets every frame whole, in order, byte for byte.
func TestFlushCarriesPartialWrites(t *testing.T) {
	opt := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, opt) }) // after the proxy's cleanup
	backend := newBenchBackend(t)
	addr, _ := startBenchProxy(t, backend.ln.Addr().String(), Options{
		Queue:             limiter.Config{Policy: limiter.Pause, MaxMessages: 1000, MaxBytes: 64 << 20, LowWater: 0.5},
		ClientWriteBuffer: 16 << 10, // the kernel doubles it: a few frames fill it
		WriteTimeout:      time.Minute,
	})
	d := ws.Dialer{NetDial: func(ctx context.Context, network, addr string) (net.Conn, error) {
		nd := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
			return rc.Control(func(fd uintptr) {
				syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
			})
		}}
		return nd.DialContext(ctx, network, addr)
	}}
	client, br, _, err := d.Dial(context.Background(), "ws://"+addr+"/")
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	up := <-backend.conns
	defer up.Close()

	// Sizes that are multiples of nothing in particular, so writes stop
	// inside frames at every kind of offset.
	const frames = 120
	payload := func(i int) []byte {
		p := make([]byte, 3000+i*997)
		for j := range p {
			p[j] = byte(i*31 + j)
		}
		return p
	}
	sent := make(chan error, 1)
	go func() {
		for i := range frames {
			if err := ws.WriteFrame(up, ws.NewBinaryFrame(payload(i))); err != nil {
				sent <- err
				return
			}
		}
		sent <- nil
	}()
	// Nothing is read until the backend has sent everything: sluice then
	// holds what the client's socket refused.
	select {
	case err := <-sent:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the backend could not send: sluice stopped reading it")
	}

	var r io.Reader = client
	if br != nil {
		r = io.MultiReader(br, client)
	}
	client.SetReadDeadline(time.Now().Add(10 * time.Second))
	for i := range frames {
		want := payload(i)
		h, err := ws.ReadHeader(r)
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if h.Length != int64(len(want)) || h.OpCode != ws.OpBinary || !h.Fin {
			t.Fatalf("frame %d: %+v, want a final binary frame of %d bytes", i, h, len(want))
		}
		got := make([]byte, h.Length)
		if _, err := io.ReadFull(r, got); err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("frame %d: first difference at %s", i, firstDiff(got, want))
		}
	}
}

func firstDiff(a, b []byte) string {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return fmt.Sprint(i)
		}
	}
	return "the end"
}
