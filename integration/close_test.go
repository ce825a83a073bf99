package integration

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/gobwas/ws"
	gorilla "github.com/gorilla/websocket"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/internal/wstest"
	"github.com/sluice-proxy/sluice/proxy"
)

// TestCloseCodesRelayed: a close frame passes through sluice with its code
// and reason in both directions, and the reply comes back.
func TestCloseCodesRelayed(t *testing.T) {
	b := newBackend(t)
	s := startSluice(t, b.url, nil)
	t.Run("client closes without a code", func(t *testing.T) {
		id := newID()
		c := wstest.Dial(t, s.addr, "/echo?id="+id, nil, nil)
		c.Write(t, wstest.Frame{Fin: true, Op: ws.OpClose, Masked: true})
		if got := b.ended(t, id); got.code != gorilla.CloseNoStatusReceived {
			t.Errorf("backend saw %v, want a close without a code (1005)", got)
		}
		// The backend answers without a code; 1005 must not go on the wire.
		if code, reason := c.ReadClose(t); code != ws.StatusNoStatusRcvd && code != ws.StatusNormalClosure {
			t.Errorf("client got close %d %q, want none or 1000", code, reason)
		}
		c.ExpectEOF(t)
	})
	for _, code := range []int{1000, 3000, 4001} {
		t.Run(fmt.Sprintf("client closes %d", code), func(t *testing.T) {
			id := newID()
			c, _ := dialGorilla(t, s.url+"/echo?id="+id, nil)
			if err := gorillaEcho(c, gorilla.TextMessage, []byte("hi")); err != nil {
				t.Fatal(err)
			}
			c.WriteControl(gorilla.CloseMessage, gorilla.FormatCloseMessage(code, "bye"), time.Now().Add(wstest.IOTimeout))
			if got := b.ended(t, id); got.code != code || got.text != "bye" {
				t.Errorf("backend saw close %v, want %d \"bye\"", got, code)
			}
			// gorilla's backend answers with the code it received.
			if ce := gorillaReadClose(t, c); ce.Code != code {
				t.Errorf("client got close reply %d %q, want %d", ce.Code, ce.Text, code)
			}
		})
		t.Run(fmt.Sprintf("backend closes %d (gorilla client)", code), func(t *testing.T) {
			id := newID()
			c, _ := dialGorilla(t, fmt.Sprintf("%s/close?code=%d&reason=bye&id=%s", s.url, code, id), nil)
			if ce := gorillaReadClose(t, c); ce.Code != code || ce.Text != "bye" {
				t.Errorf("client got close %d %q, want %d \"bye\"", ce.Code, ce.Text, code)
			}
			// gorilla's client answers with the code it received.
			if got := b.ended(t, id); got.code != code {
				t.Errorf("backend got close reply %v, want %d", got, code)
			}
		})
		t.Run(fmt.Sprintf("backend closes %d after a message (coder client)", code), func(t *testing.T) {
			id := newID()
			c := dialCoder(t, fmt.Sprintf("%s/close?code=%d&reason=bye&after=msg&id=%s", s.url, code, id), nil)
			ctx, cancel := context.WithTimeout(context.Background(), wstest.IOTimeout)
			defer cancel()
			if err := c.Write(ctx, websocket.MessageText, []byte("go")); err != nil {
				t.Fatal(err)
			}
			_, _, err := c.Read(ctx)
			var ce websocket.CloseError
			if !errors.As(err, &ce) || int(ce.Code) != code || ce.Reason != "bye" {
				t.Errorf("client read ended with %v, want close %d \"bye\"", err, code)
			}
			if got := b.ended(t, id); got.code != code || got.text != "bye" {
				t.Errorf("backend got close reply %v, want %d \"bye\" (coder echoes the reason)", got, code)
			}
		})
	}
}

// TestAbruptClientLoss: a client whose socket vanishes without a close
// frame costs the backend a 1001 Going Away close, not a dead socket.
func TestAbruptClientLoss(t *testing.T) {
	b := newBackend(t)
	s := startSluice(t, b.url, nil)
	id := newID()
	c, _ := dialGorilla(t, s.url+"/echo?id="+id, nil)
	if err := gorillaEcho(c, gorilla.TextMessage, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	c.UnderlyingConn().Close()
	if got := b.ended(t, id); got.code != gorilla.CloseGoingAway {
		t.Errorf("backend saw %v, want close 1001", got)
	}
}

// TestAbruptUpstreamLoss: a backend whose socket vanishes without a close
// frame costs the client a close with the upstream failure code within a
// second: 1014 Bad Gateway by default, or the configured code.
func TestAbruptUpstreamLoss(t *testing.T) {
	t.Run("default 1014 (coder client)", func(t *testing.T) {
		b := newBackend(t)
		s := startSluice(t, b.url, nil)
		id := newID()
		c := dialCoder(t, s.url+"/drop?id="+id, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := c.Write(ctx, websocket.MessageText, []byte("last words")); err != nil {
			t.Fatal(err)
		}
		began := time.Now()
		_, _, err := c.Read(ctx)
		took := time.Since(began)
		if code := websocket.CloseStatus(err); code != 1014 {
			t.Errorf("client read ended with %v (close status %d), want close 1014", err, code)
		}
		if took > time.Second {
			t.Errorf("close arrived after %v, want within 1s", took)
		}
		b.ended(t, id)
	})
	t.Run("configured 1011 (gorilla client)", func(t *testing.T) {
		b := newBackend(t)
		s := startSluiceEnv(t, b.url, map[string]string{config.Prefix + "UPSTREAM_CLOSE_CODE": "1011"}, nil)
		c, _ := dialGorilla(t, s.url+"/drop", nil)
		c.WriteMessage(gorilla.TextMessage, []byte("last words"))
		if ce := gorillaReadClose(t, c); ce.Code != 1011 {
			t.Errorf("client got close %d %q, want 1011", ce.Code, ce.Text)
		}
	})
}

// TestPingPongRelayed: pings and pongs pass through sluice both ways with
// their payloads; each side's automatic pong answers the other's ping.
func TestPingPongRelayed(t *testing.T) {
	b := newBackend(t)
	s := startSluice(t, b.url, nil)
	id := newID()
	c, _ := dialGorilla(t, s.url+"/ping?id="+id, nil)
	clientPings := make(chan string, 8)
	clientPongs := make(chan string, 8)
	c.SetPingHandler(func(p string) error {
		nonBlockingSend(clientPings, p)
		return c.WriteControl(gorilla.PongMessage, []byte(p), time.Now().Add(wstest.IOTimeout))
	})
	c.SetPongHandler(func(p string) error {
		nonBlockingSend(clientPongs, p)
		return nil
	})
	if err := c.WriteControl(gorilla.PingMessage, []byte("cp-1"), time.Now().Add(wstest.IOTimeout)); err != nil {
		t.Fatal(err)
	}
	// Reading the echo runs the control handlers for the frames before it.
	if err := gorillaEcho(c, gorilla.TextMessage, []byte("sync")); err != nil {
		t.Fatal(err)
	}
	uc := b.waitConn(t, id)
	if got := recv(t, clientPings, "the backend's ping at the client"); got != "bp-1" {
		t.Errorf("client got ping %q, want \"bp-1\"", got)
	}
	if got := recv(t, uc.pongs, "the client's pong at the backend"); got != "bp-1" {
		t.Errorf("backend got pong %q, want \"bp-1\"", got)
	}
	if got := recv(t, uc.pings, "the client's ping at the backend"); got != "cp-1" {
		t.Errorf("backend got ping %q, want \"cp-1\"", got)
	}
	if got := recv(t, clientPongs, "the backend's pong at the client"); got != "cp-1" {
		t.Errorf("client got pong %q, want \"cp-1\"", got)
	}
}

// TestProtocolViolation: a client that breaks RFC 6455 gets 1002 and loses
// its socket; its backend connection is closed with 1001; a neighbour
// session on the same sluice carries on.
func TestProtocolViolation(t *testing.T) {
	b := newBackend(t)
	s := startSluice(t, b.url, nil)
	neighbour, _ := dialGorilla(t, s.url+"/echo", nil)
	cases := []struct {
		name string
		bad  wstest.Frame
	}{
		{"unmasked frame", wstest.Frame{Fin: true, Op: ws.OpText, Masked: false, Payload: []byte("no mask")}},
		{"reserved opcode", wstest.Frame{Fin: true, Op: 0x3, Masked: true, Payload: []byte("op 3")}},
		{"reserved control opcode", wstest.Frame{Fin: true, Op: 0xB, Masked: true}},
		{"one-byte close payload", wstest.Frame{Fin: true, Op: ws.OpClose, Masked: true, Payload: []byte{0x03}}},
		{"RSV1 without extension", wstest.Frame{Fin: true, Rsv: 4, Op: ws.OpText, Masked: true, Payload: []byte("rsv")}},
		{"fragmented ping", wstest.Frame{Fin: false, Op: ws.OpPing, Masked: true, Payload: []byte("p")}},
		{"continuation without message", wstest.Frame{Fin: true, Op: ws.OpContinuation, Masked: true, Payload: []byte("c")}},
		{"invalid close code", wstest.Frame{Fin: true, Op: ws.OpClose, Masked: true, Payload: closePayload(1005, "")}},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if err := gorillaEcho(neighbour, gorilla.TextMessage, []byte(fmt.Sprintf("before %d", i))); err != nil {
				t.Fatalf("neighbour before: %v", err)
			}
			id := newID()
			c := wstest.Dial(t, s.addr, "/echo?id="+id, nil, nil)
			c.Write(t, wstest.Frame{Fin: true, Op: ws.OpText, Masked: true, Payload: []byte("fine so far")})
			if f := c.Read(t); string(f.Payload) != "fine so far" {
				t.Fatalf("echo = %v", f)
			}
			c.Write(t, tc.bad)
			if code, reason := c.ReadClose(t); code != ws.StatusProtocolError {
				t.Errorf("client got close %d %q, want 1002", code, reason)
			}
			c.ExpectEOF(t)
			if got := b.ended(t, id); got.code != gorilla.CloseGoingAway {
				t.Errorf("backend saw %v, want close 1001", got)
			}
			if err := gorillaEcho(neighbour, gorilla.BinaryMessage, []byte(fmt.Sprintf("after %d", i))); err != nil {
				t.Fatalf("neighbour after: %v", err)
			}
		})
	}
}

// TestOversizeMessage: past MaxMessageBytes across fragments, or past
// MaxFrameBytes in one frame, the client gets 1009 Message Too Big and the
// backend a 1001.
func TestOversizeMessage(t *testing.T) {
	b := newBackend(t)
	s := startSluice(t, b.url, func(o *proxy.Options) {
		o.MaxMessageBytes = 1024
		o.MaxFrameBytes = 1000
	})
	chunk := []byte(strings.Repeat("z", 600))
	cases := []struct {
		name   string
		frames []wstest.Frame
	}{
		{"two fragments of 600", []wstest.Frame{
			{Fin: false, Op: ws.OpText, Masked: true, Payload: chunk},
			{Fin: true, Op: ws.OpContinuation, Masked: true, Payload: chunk},
		}},
		{"one frame of 1001", []wstest.Frame{
			{Fin: true, Op: ws.OpBinary, Masked: true, Payload: make([]byte, 1001)},
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			id := newID()
			c := wstest.Dial(t, s.addr, "/echo?id="+id, nil, nil)
			// A message at the limit passes.
			c.Write(t, wstest.Frame{Fin: false, Op: ws.OpText, Masked: true, Payload: chunk[:512]},
				wstest.Frame{Fin: true, Op: ws.OpContinuation, Masked: true, Payload: chunk[:512]})
			if f := c.Read(t); len(f.Payload) != 1024 {
				t.Fatalf("echo of a 1024-byte message = %v", f)
			}
			c.Write(t, tc.frames...)
			if code, reason := c.ReadClose(t); code != ws.StatusMessageTooBig {
				t.Errorf("client got close %d %q, want 1009", code, reason)
			}
			c.ExpectEOF(t)
			if got := b.ended(t, id); got.code != gorilla.CloseGoingAway {
				t.Errorf("backend saw %v, want close 1001", got)
			}
		})
	}
}
