package integration

// A backend that stops in the middle of a frame (issue: the client saw only
// sluice's pings and no close for 50 s): SLUICE_UPSTREAM_FRAME_READ_TIMEOUT
// ends the session, 1014 to the client after the messages that did arrive.

import (
	"errors"
	"io"
	"os"
	"testing"
	"time"

	"github.com/gobwas/ws"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/internal/wstest"
)

// stallingBackend sends one whole text message, then the header and the
// first part bytes of a binary frame of size bytes, then nothing more
// until the test ends.
func stallingBackend(t *testing.T, size, part int) *wstest.RawBackend {
	t.Helper()
	stop := make(chan struct{})
	b := wstest.ServeRaw(t, wstest.RawOptions{}, func(c *wstest.RawConn) {
		out := wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpText, Payload: []byte("first")})
		stalled := wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpBinary, Payload: make([]byte, size)})
		out = append(out, stalled[:len(stalled)-size+part]...)
		c.SetWriteDeadline(time.Now().Add(wstest.IOTimeout))
		if _, err := c.Write(out); err != nil {
			t.Errorf("backend write: %v", err)
		}
		<-stop
	})
	t.Cleanup(func() { close(stop) })
	return b
}

func TestUpstreamStallsMidFrame(t *testing.T) {
	const timeout = 500 * time.Millisecond
	b := stallingBackend(t, 1000, 500)
	s := startSluiceEnv(t, b.URL, map[string]string{config.Prefix + "UPSTREAM_FRAME_READ_TIMEOUT": timeout.String()}, nil)
	c := wstest.Dial(t, s.addr, "/", nil, nil)
	began := time.Now()
	c.Conn.SetReadDeadline(began.Add(wstest.IOTimeout))
	f, err := wstest.ReadFrame(c.BR)
	if err != nil || f.Op != ws.OpText || string(f.Payload) != "first" {
		t.Fatalf("first frame %v, %v; want the text message \"first\"", f, err)
	}
	f, err = wstest.ReadFrame(c.BR)
	if err != nil {
		t.Fatalf("after the whole message: %v, want a close frame", err)
	}
	if code, _ := wstest.CloseOf(f); f.Op != ws.OpClose || code != 1014 {
		t.Fatalf("after the whole message: %v, want a close with 1014", f)
	}
	if after := time.Since(began); after < timeout {
		t.Errorf("closed %v after the stall began, before SLUICE_UPSTREAM_FRAME_READ_TIMEOUT %v", after, timeout)
	}
	c.Conn.Close()
	waitFor(t, wstest.IOTimeout, "the session to end", func() bool { return s.srv.Sessions() == 0 })
}

// A frame larger than 128 KiB is spliced to the client as it arrives: when
// the backend stalls in it, the client's frame is torn and can have no
// close frame after it; its connection is cut, not left waiting.
func TestUpstreamStallsMidSplicedFrame(t *testing.T) {
	const (
		timeout = 500 * time.Millisecond
		size    = 1 << 20
		part    = 256 << 10
	)
	b := stallingBackend(t, size, part)
	s := startSluiceEnv(t, b.URL, map[string]string{config.Prefix + "UPSTREAM_FRAME_READ_TIMEOUT": timeout.String()}, nil)
	c := wstest.Dial(t, s.addr, "/", nil, nil)
	began := time.Now()
	c.Conn.SetReadDeadline(began.Add(wstest.IOTimeout))
	f, err := wstest.ReadFrame(c.BR)
	if err != nil || string(f.Payload) != "first" {
		t.Fatalf("first frame %v, %v; want the text message \"first\"", f, err)
	}
	h, err := ws.ReadHeader(c.BR)
	if err != nil || h.Length != size {
		t.Fatalf("second header %+v, %v; want a frame of %d bytes", h, err, size)
	}
	n, err := io.Copy(io.Discard, c.BR)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("after %d bytes of the stalled frame: still open after %v", n, wstest.IOTimeout)
	}
	if n != part {
		t.Errorf("got %d bytes of the stalled frame, want the %d sent", n, part)
	}
	if after := time.Since(began); after < timeout {
		t.Errorf("cut %v after the stall began, before SLUICE_UPSTREAM_FRAME_READ_TIMEOUT %v", after, timeout)
	}
	waitFor(t, wstest.IOTimeout, "the session to end", func() bool { return s.srv.Sessions() == 0 })
}
