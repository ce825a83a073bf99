package wstest

import (
	"testing"

	"github.com/gobwas/ws"
	"go.uber.org/goleak"
)

// TestMain fails the run if a backend handler outlives its test.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestEchoThroughRawClient runs the raw client against the echo backend:
// the upgrade, a masked message each way, and the close handshake.
func TestEchoThroughRawClient(t *testing.T) {
	b := ServeRaw(t, RawOptions{}, func(c *RawConn) { Echo(c) })
	c := Dial(t, b.Addr, "/", []string{"X-Test: 1"}, nil)
	c.Write(t, Frame{Fin: true, Op: ws.OpBinary, Masked: true, Payload: []byte{1, 2, 3}})
	if f := c.Read(t); f.Op != ws.OpBinary || string(f.Payload) != "\x01\x02\x03" {
		t.Fatalf("echo: %v", f)
	}
	c.Write(t, Frame{Fin: true, Op: ws.OpClose, Masked: true, Payload: ws.NewCloseFrameBody(ws.StatusGoingAway, "")})
	if code, _ := c.ReadClose(t); code != ws.StatusGoingAway {
		t.Errorf("close code %d, want %d", code, ws.StatusGoingAway)
	}
	c.ExpectEOF(t)
	if b.Accepts.Load() != 1 {
		t.Errorf("%d accepts, want 1", b.Accepts.Load())
	}
}
