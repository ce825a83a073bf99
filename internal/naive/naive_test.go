package naive

import (
	"context"
	"encoding/binary"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
	"go.uber.org/goleak"

	"github.com/sluice-proxy/sluice/internal/wstest"
)

// TestMain fails the run if a reader, writer or broadcaster outlives Close.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestBroadcast has one client read numbered messages and another stop
// reading, in each way the backend can be served and write, and checks
// that the messages arrive in order and that Close ends everything,
// whatever the stalled client holds up.
func TestBroadcast(t *testing.T) {
	for _, tc := range []struct {
		name        string
		cfg         Config
		http, queue bool
	}{
		{"queues", Config{Size: 512, Rate: 500}, false, true},
		{"shared/http", Config{Size: 512, Rate: 500, Shared: true}, true, true},
		{"serialise", Config{Size: 512, Rate: 500, Serialise: true}, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := New(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			served := make(chan struct{})
			var srv *http.Server
			if tc.http {
				srv = &http.Server{Handler: b, ReadHeaderTimeout: 5 * time.Second}
				go func() { defer close(served); srv.Serve(ln) }()
			} else {
				go func() { defer close(served); b.Serve(ln) }()
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			url := "ws://" + ln.Addr().String() + "/"
			fast, _, _, err := ws.Dial(ctx, url)
			if err != nil {
				t.Fatal(err)
			}
			defer fast.Close()
			stalled, _, _, err := ws.Dial(ctx, url)
			if err != nil {
				t.Fatal(err)
			}
			defer stalled.Close()
			for b.Stats().Connected != 2 {
				time.Sleep(time.Millisecond)
			}
			b.Start()
			fast.SetReadDeadline(time.Now().Add(5 * time.Second))
			for want := uint64(1); want <= 200; want++ {
				msg, err := wsutil.ReadServerBinary(fast)
				if err != nil {
					t.Fatalf("message %d: %v", want, err)
				}
				if len(msg) != tc.cfg.Size {
					t.Fatalf("message %d has %d bytes, want %d", want, len(msg), tc.cfg.Size)
				}
				if seq := binary.BigEndian.Uint64(msg); seq != want {
					t.Fatalf("got message %d, want %d", seq, want)
				}
			}
			if tc.queue && b.Stats().PeakBacklogMessages == 0 {
				t.Errorf("no message was ever queued")
			}
			if tc.http {
				srv.Close()
			} else {
				ln.Close()
			}
			<-served
			b.Close()
			s := b.Stats()
			if s.Accepted != 2 || s.Connected != 0 || s.QueuedBytes != 0 || s.Broadcasts < 200 {
				t.Errorf("after Close: %+v", s)
			}
		})
	}
}

// TestCloseEchoed checks that a client's close is answered with its code.
func TestCloseEchoed(t *testing.T) {
	_, url := serveBackend(t, Config{Size: HeaderLen})
	c, _, _, err := ws.Dial(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if err := ws.WriteFrame(c, ws.MaskFrame(ws.NewPingFrame([]byte("p")))); err != nil {
		t.Fatal(err)
	}
	if f, err := wstest.ReadFrameMax(c, ws.MaxControlFramePayloadSize); err != nil || f.Op != ws.OpPong || string(f.Payload) != "p" {
		t.Fatalf("got %v %q (%v), want pong \"p\"", f.Op, f.Payload, err)
	}
	if err := ws.WriteFrame(c, ws.MaskFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(ws.StatusGoingAway, "")))); err != nil {
		t.Fatal(err)
	}
	f, err := wstest.ReadFrameMax(c, ws.MaxControlFramePayloadSize)
	if err != nil || f.Op != ws.OpClose {
		t.Fatalf("got %v (%v), want a close", f.Op, err)
	}
	if code, _ := ws.ParseCloseFrameData(f.Payload); code != ws.StatusGoingAway {
		t.Errorf("close code %d, want %d", code, ws.StatusGoingAway)
	}
}

// TestCountsInbound checks that the backend counts what each client sends,
// a fragmented message once, and keeps the busiest connection's count: the
// demo reads a flooding client's rate from it.
func TestCountsInbound(t *testing.T) {
	b, url := serveBackend(t, Config{Size: HeaderLen})
	busy, _, _, err := ws.Dial(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	quiet, _, _, err := ws.Dial(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer quiet.Close()
	busy.SetDeadline(time.Now().Add(5 * time.Second))
	quiet.SetDeadline(time.Now().Add(5 * time.Second))
	msg := ws.MaskFrame(ws.NewTextFrame([]byte("subscribe")))
	for range 5 {
		if err := ws.WriteFrame(busy, msg); err != nil {
			t.Fatal(err)
		}
	}
	first := ws.MaskFrame(ws.Frame{Header: ws.Header{OpCode: ws.OpText, Length: 3}, Payload: []byte("sub")})
	rest := ws.MaskFrame(ws.Frame{Header: ws.Header{Fin: true, OpCode: ws.OpContinuation, Length: 6}, Payload: []byte("scribe")})
	for _, f := range []ws.Frame{first, rest} {
		if err := ws.WriteFrame(quiet, f); err != nil {
			t.Fatal(err)
		}
	}
	// A ping after the data: its pong says every frame before it was read.
	for _, c := range []net.Conn{busy, quiet} {
		if err := ws.WriteFrame(c, ws.MaskFrame(ws.NewPingFrame(nil))); err != nil {
			t.Fatal(err)
		}
		if f, err := wstest.ReadFrameMax(c, ws.MaxControlFramePayloadSize); err != nil || f.Op != ws.OpPong {
			t.Fatalf("got %v (%v), want a pong", f.Op, err)
		}
	}
	if s := b.Stats(); s.Received != 6 || s.PeakConnReceived != 5 {
		t.Errorf("received %d, busiest connection %d; want 6 and 5", s.Received, s.PeakConnReceived)
	}
}

// TestEcho has two clients send numbered messages carrying their ids, and
// checks that each comes back as sent and that the backend counts them by
// client id, after the connection ends too.
func TestEcho(t *testing.T) {
	b, url := serveBackend(t, Config{Size: HeaderLen, Echo: true, Work: 50 * time.Microsecond})
	if b.Stats().WorkIterations <= 0 {
		t.Fatalf("work of 50µs calibrated to %d iterations", b.Stats().WorkIterations)
	}
	for id, n := range map[uint64]int{7: 30, 9: 5} {
		c, _, _, err := ws.Dial(context.Background(), url)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		for seq := 1; seq <= n; seq++ {
			msg := make([]byte, EchoHeaderLen+3)
			binary.BigEndian.PutUint64(msg, uint64(seq))
			binary.BigEndian.PutUint64(msg[16:], id)
			if err := wsutil.WriteClientBinary(c, msg); err != nil {
				t.Fatal(err)
			}
			got, err := wsutil.ReadServerBinary(c)
			if err != nil || string(got) != string(msg) {
				t.Fatalf("client %d, message %d: echo %x (%v), want %x", id, seq, got, err, msg)
			}
		}
		c.Close()
	}
	if _, err := New(Config{Size: HeaderLen, Echo: true, Rate: 1}); err == nil {
		t.Errorf("echo with a broadcast rate: no error")
	}
	s := b.Stats()
	if s.Echoed != 35 || s.PerClient[7] != 30 || s.PerClient[9] != 5 {
		t.Errorf("echoed %d, per client %v: want 35, 7:30 and 9:5", s.Echoed, s.PerClient)
	}
}

// serveBackend starts a backend with cfg on a loopback listener, closed
// when the test ends, and returns it and its URL.
func serveBackend(t *testing.T, cfg Config) (*Backend, string) {
	t.Helper()
	b, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go b.Serve(ln)
	t.Cleanup(func() { ln.Close(); b.Close() })
	return b, "ws://" + ln.Addr().String() + "/"
}
