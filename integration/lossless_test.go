package integration

// Lossless and exact endings: every frame a peer sends arrives, in order,
// even while a session ends; the close goes after it, and TCP ends
// without a reset while the peers behave.

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gobwas/ws"

	"github.com/sluice-proxy/sluice/internal/wstest"
	"github.com/sluice-proxy/sluice/proxy"
)

// pingBurst is n pings with distinct payloads, as one byte string.
func pingBurst(n int, masked bool) ([]byte, [][]byte) {
	var wire []byte
	var payloads [][]byte
	for i := range n {
		p := []byte(fmt.Sprintf("ping-%04d", i))
		payloads = append(payloads, p)
		wire = append(wire, wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpPing, Masked: masked, Payload: p})...)
	}
	return wire, payloads
}

// A client's burst of pings, in one write or in octet-wise chops, gets
// every pong, in order, with its payload: sluice forwards them all.
func TestPingBurstFromClient(t *testing.T) {
	b := newBackend(t)
	s := startSluice(t, b.url, nil)
	for _, tc := range []struct {
		name  string
		n     int
		chops bool
	}{
		{"1000 in one write", 1000, false},
		{"10 in octet-wise chops", 10, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := wstest.Dial(t, s.addr, "/echo", nil, nil)
			wire, payloads := pingBurst(tc.n, true)
			c.Conn.SetWriteDeadline(time.Now().Add(wstest.IOTimeout))
			if tc.chops {
				for i := range wire {
					if _, err := c.Conn.Write(wire[i : i+1]); err != nil {
						t.Fatalf("write byte %d: %v", i, err)
					}
				}
			} else if _, err := c.Conn.Write(wire); err != nil {
				t.Fatalf("write: %v", err)
			}
			for i, want := range payloads {
				f := c.Read(t)
				if f.Op != ws.OpPong || !bytes.Equal(f.Payload, want) {
					t.Fatalf("frame %d = %v, want a pong %q", i, f, want)
				}
			}
			c.Write(t, wstest.Frame{Fin: true, Op: ws.OpClose, Masked: true, Payload: closePayload(1000, "")})
			if code, _ := c.ReadClose(t); code != 1000 {
				t.Fatalf("close %d, want 1000", code)
			}
			expectCleanEOF(t, c)
		})
	}
}

// A backend's burst of 1000 pings in one write reaches the client whole,
// and the client's 1000 pongs reach the backend.
func TestPingBurstFromBackend(t *testing.T) {
	const n = 1000
	wire, payloads := pingBurst(n, false)
	pongs := make(chan error, 1)
	addr := wstest.ServeRaw(t, wstest.RawOptions{}, func(conn *wstest.RawConn) {
		conn.SetDeadline(time.Now().Add(2 * wstest.IOTimeout))
		if _, err := conn.Write(wire); err != nil {
			pongs <- err
			return
		}
		for i, want := range payloads {
			f, err := wstest.ReadFrame(conn.BR)
			if err != nil {
				pongs <- fmt.Errorf("pong %d: %w", i, err)
				return
			}
			if f.Op != ws.OpPong || !bytes.Equal(f.Payload, want) {
				pongs <- fmt.Errorf("frame %d = %v, want a pong %q", i, f, want)
				return
			}
		}
		pongs <- nil
		wstest.ReadFrame(conn.BR) // the client's close
		conn.Write(wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpClose, Payload: closePayload(1000, "")}))
	}).Addr
	s := startSluice(t, "ws://"+addr, nil)
	c := wstest.Dial(t, s.addr, "/", nil, nil)
	var answers []byte
	for i, want := range payloads {
		f := c.Read(t)
		if f.Op != ws.OpPing || !bytes.Equal(f.Payload, want) {
			t.Fatalf("frame %d = %v, want a ping %q", i, f, want)
		}
		answers = append(answers, wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpPong, Masked: true, Payload: f.Payload})...)
	}
	c.Conn.SetWriteDeadline(time.Now().Add(wstest.IOTimeout))
	if _, err := c.Conn.Write(answers); err != nil {
		t.Fatalf("write pongs: %v", err)
	}
	if err := <-pongs; err != nil {
		t.Fatalf("backend: %v", err)
	}
	c.Write(t, wstest.Frame{Fin: true, Op: ws.OpClose, Masked: true, Payload: closePayload(1000, "")})
	if code, _ := c.ReadClose(t); code != 1000 {
		t.Fatalf("close %d, want 1000", code)
	}
	expectCleanEOF(t, c)
}

// A protocol error does not swallow the replies already on their way: the
// echo of the valid message before the bad frame arrives, then 1002, then
// the end of the stream without a reset, though the client sent more
// bytes after the bad frame.
func TestProtocolErrorAfterData(t *testing.T) {
	b := newBackend(t)
	s := startSluice(t, b.url, nil)
	bad := []struct {
		name  string
		frame wstest.Frame
	}{
		{"rsv1", wstest.Frame{Fin: true, Rsv: 4, Op: ws.OpText, Masked: true, Payload: []byte("x")}},
		{"rsv2", wstest.Frame{Fin: true, Rsv: 2, Op: ws.OpText, Masked: true, Payload: []byte("x")}},
		{"rsv3", wstest.Frame{Fin: true, Rsv: 1, Op: ws.OpBinary, Masked: true, Payload: []byte("x")}},
		{"opcode 3", wstest.Frame{Fin: true, Op: 3, Masked: true}},
		{"opcode 7", wstest.Frame{Fin: true, Op: 7, Masked: true}},
		{"opcode 0xB", wstest.Frame{Fin: true, Op: 0xB, Masked: true}},
		{"opcode 0xF", wstest.Frame{Fin: true, Op: 0xF, Masked: true}},
		{"lone continuation", wstest.Frame{Fin: true, Op: ws.OpContinuation, Masked: true, Payload: []byte("x")}},
		{"unmasked", wstest.Frame{Fin: true, Op: ws.OpText, Payload: []byte("x")}},
		{"fragmented ping", wstest.Frame{Fin: false, Op: ws.OpPing, Masked: true}},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			c := wstest.Dial(t, s.addr, "/echo", nil, nil)
			msg := []byte("before the bad frame: " + tc.name)
			var wire []byte
			wire = append(wire, wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpText, Masked: true, Payload: msg})...)
			wire = append(wire, wstest.Encode(tc.frame)...)
			// More after the bad frame: sluice must read it away, not
			// close on it with a reset.
			wire = append(wire, wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpText, Masked: true, Payload: bytes.Repeat([]byte("z"), 4096)})...)
			c.Conn.SetWriteDeadline(time.Now().Add(wstest.IOTimeout))
			if _, err := c.Conn.Write(wire); err != nil {
				t.Fatalf("write: %v", err)
			}
			f := c.Read(t)
			if f.Op != ws.OpText || !bytes.Equal(f.Payload, msg) {
				t.Fatalf("first frame = %v, want the echo %q", f, msg)
			}
			if code, _ := c.ReadClose(t); code != ws.StatusProtocolError {
				t.Fatalf("close %d, want 1002", code)
			}
			expectCleanEOF(t, c)
		})
	}
}

// On shutdown the client still gets what the backend sent before it
// answered sluice's 1001, then 1001.
func TestShutdownDeliversInFlight(t *testing.T) {
	const burst = 50 // within the client queue's 100 messages
	got := make(chan string, 1)
	addr := wstest.ServeRaw(t, wstest.RawOptions{}, func(conn *wstest.RawConn) {
		conn.SetDeadline(time.Now().Add(2 * wstest.IOTimeout))
		// Wait for sluice's close, then send a burst before answering it:
		// all of it was sent before the backend learned of the end.
		f, err := wstest.ReadFrame(conn.BR)
		if err != nil || f.Op != ws.OpClose {
			got <- fmt.Sprintf("want sluice's close, got %v %v", f, err)
			return
		}
		code, _ := ws.ParseCloseFrameData(f.Payload)
		got <- fmt.Sprint(code)
		var wire []byte
		for i := range burst {
			wire = append(wire, wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpText, Payload: fmt.Appendf(nil, "late-%d", i)})...)
		}
		wire = append(wire, wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpClose, Payload: closePayload(1000, "")})...)
		conn.Write(wire)
		io.Copy(io.Discard, conn.BR) // until sluice closes
	}).Addr
	s := startSluice(t, "ws://"+addr, func(o *proxy.Options) { o.CloseTimeout = 4 * time.Second })
	c := wstest.Dial(t, s.addr, "/", nil, nil)
	waitFor(t, wstest.IOTimeout, "the session", func() bool { return s.srv.Sessions() == 1 })
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), wstest.ShutdownTimeout)
		defer cancel()
		shut <- s.shutdown(ctx)
	}()
	for i := range burst {
		f := c.Read(t)
		if want := fmt.Sprintf("late-%d", i); f.Op != ws.OpText || string(f.Payload) != want {
			t.Fatalf("frame %d = %v, want %q", i, f, want)
		}
	}
	if code, _ := c.ReadClose(t); code != ws.StatusGoingAway {
		t.Fatalf("close %d, want 1001", code)
	}
	c.Write(t, wstest.Frame{Fin: true, Op: ws.OpClose, Masked: true, Payload: closePayload(1001, "")})
	expectCleanEOF(t, c)
	if err := <-shut; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if code := <-got; code != "1001" {
		t.Fatalf("backend got close %s, want 1001", code)
	}
}

// After a normal close handshake the backend closes TCP first, so
// TIME_WAIT stays on its side: sluice waits for its FIN.
func TestUpstreamClosesTCPFirst(t *testing.T) {
	sawEOF := make(chan error, 1)
	addr := wstest.ServeRaw(t, wstest.RawOptions{}, func(conn *wstest.RawConn) {
		conn.SetDeadline(time.Now().Add(wstest.IOTimeout))
		f, err := wstest.ReadFrame(conn.BR)
		if err != nil || f.Op != ws.OpClose {
			sawEOF <- fmt.Errorf("want the client's close, got %v %v", f, err)
			return
		}
		conn.Write(wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpClose, Payload: f.Payload}))
		// A server closes first: before it does, sluice must not have.
		var one [1]byte
		conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := conn.BR.Read(one[:]); !errors.Is(err, os.ErrDeadlineExceeded) {
			sawEOF <- fmt.Errorf("sluice closed the upstream connection before the backend did: %v", err)
			return
		}
		sawEOF <- nil
	}).Addr
	s := startSluice(t, "ws://"+addr, nil)
	c := wstest.Dial(t, s.addr, "/", nil, nil)
	c.Write(t, wstest.Frame{Fin: true, Op: ws.OpClose, Masked: true, Payload: closePayload(1000, "bye")})
	if code, _ := c.ReadClose(t); code != 1000 {
		t.Fatalf("close %d, want 1000", code)
	}
	expectCleanEOF(t, c)
	if err := <-sawEOF; err != nil {
		t.Fatal(err)
	}
	waitFor(t, wstest.IOTimeout, "the session to end", func() bool { return s.srv.Sessions() == 0 })
}

// expectCleanEOF checks that sluice ends the client's stream with FIN, not
// a reset, and sends nothing after its close frame.
func expectCleanEOF(t testing.TB, c *wstest.Client) {
	t.Helper()
	c.Conn.SetReadDeadline(time.Now().Add(wstest.IOTimeout))
	var buf [512]byte
	for {
		n, err := c.BR.Read(buf[:])
		if n > 0 {
			t.Fatalf("got %d more bytes after the close frame: %q", n, buf[:n])
		}
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			t.Fatalf("stream did not end with FIN: %v", err)
		}
	}
}

// kernelSocket is one line of /proc/net/tcp[6]: a socket's state and what
// its send queue holds.
type kernelSocket struct {
	local, remote string // hex addr:port as the kernel prints them
	state         string
	txQueue       int64
}

// socketsTo lists the kernel's TCP sockets over IPv4 (the tests dial
// 127.0.0.1) whose local port is local and remote port is remote.
func socketsTo(t testing.TB, local, remote int) []kernelSocket {
	t.Helper()
	var out []kernelSocket
	for _, path := range []string{"/proc/net/tcp"} {
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 5 {
				continue
			}
			if portOf(f[1]) != local || portOf(f[2]) != remote {
				continue
			}
			q := strings.SplitN(f[4], ":", 2)
			var tx int64
			fmt.Sscanf(q[0], "%x", &tx)
			out = append(out, kernelSocket{local: f[1], remote: f[2], state: f[3], txQueue: tx})
		}
	}
	return out
}

func portOf(hexAddr string) int {
	i := strings.LastIndexByte(hexAddr, ':')
	b, err := hex.DecodeString(hexAddr[i+1:])
	if err != nil || len(b) != 2 {
		return -1
	}
	return int(b[0])<<8 | int(b[1])
}

// What the kernel holds unsent for a stalled client counts toward the
// ceiling, and an evicted client does not leave it behind in an orphaned
// socket for longer than the close timeout.
func TestStalledClientKernelMemory(t *testing.T) {
	const closeTimeout = time.Second
	msg := wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpBinary, Payload: bytes.Repeat([]byte("m"), 16<<10)})
	addr := wstest.ServeRaw(t, wstest.RawOptions{}, func(conn *wstest.RawConn) {
		for range 4096 { // 64 MiB at most; sluice evicts well before
			conn.SetWriteDeadline(time.Now().Add(wstest.IOTimeout))
			if _, err := conn.Write(msg); err != nil {
				return
			}
		}
	}).Addr
	s := startSluice(t, "ws://"+addr, func(o *proxy.Options) {
		o.CloseTimeout = closeTimeout
		o.Queue.MaxMessages, o.Queue.MaxBytes = 100000, 1<<30 // only the ceiling acts
		o.Budget.Ceiling = 8 << 20
	})
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4<<10) })
	}}
	conn, _, _, err := ws.Dialer{NetDial: d.DialContext, Timeout: wstest.IOTimeout}.Dial(context.Background(), s.url+"/")
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer conn.Close() // never read: the client stalls
	clientPort := conn.LocalAddr().(*net.TCPAddr).Port
	sluicePort := conn.RemoteAddr().(*net.TCPAddr).Port

	var peakUnsent int64
	waitFor(t, 2*wstest.IOTimeout, "the eviction", func() bool {
		peakUnsent = max(peakUnsent, s.srv.Budget().Stats().UnsentBytes)
		return len(s.srv.RecentEvictions()) > 0
	})
	evictedAt := time.Now()
	if ev := s.srv.RecentEvictions()[0]; ev.Reason != "global_ceiling" {
		t.Fatalf("evicted for %q, want global_ceiling", ev.Reason)
	}
	if peakUnsent < 64<<10 {
		t.Errorf("peak unsent bytes counted %d, want the kernel's share of a stalled client (> 64 KiB)", peakUnsent)
	}
	// An orphan would keep them for minutes; sluice lets go at the close
	// timeout. The slack is for a loaded machine's timers and for reading
	// the kernel's socket table, which takes long with many sockets in
	// TIME_WAIT after the rest of the suite: not for sluice.
	const slack = 4 * time.Second
	waitFor(t, closeTimeout+slack, "sluice's socket to the client to let go of its unsent bytes", func() bool {
		for _, k := range socketsTo(t, sluicePort, clientPort) {
			if k.txQueue > 0 {
				return false
			}
		}
		return true
	})
	if took := time.Since(evictedAt); took > closeTimeout+slack {
		t.Errorf("unsent bytes held %v after the eviction, want within the %v close timeout", took, closeTimeout)
	}
	t.Logf("peak unsent counted: %d KiB; freed %v after the eviction", peakUnsent>>10, time.Since(evictedAt).Round(time.Millisecond))
}
