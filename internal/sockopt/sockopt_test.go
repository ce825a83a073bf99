package sockopt

import (
	"errors"
	"io"
	"net"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// pair is a loopback TCP connection: the dialled end and the accepted
// one. d dials it, so that its Control runs before the connect.
func pair(t *testing.T, d *net.Dialer) (dialled, accepted net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(got)
			return
		}
		got <- c
	}()
	c, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	a, ok := <-got
	if !ok {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); a.Close() })
	return c, a
}

// buffer reads opt of conn's socket back.
func buffer(t *testing.T, conn net.Conn, opt int) int {
	t.Helper()
	raw, err := conn.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var gerr error
	raw.Control(func(fd uintptr) { n, gerr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, opt) })
	if gerr != nil {
		t.Fatal(gerr)
	}
	return n
}

// TestBuffers: DialBuffers sets both buffers before the connect and
// SetConnBuffer after it; Linux reports twice what was set (its
// bookkeeping share), so a value near the request, not the autotuned
// default of hundreds of KiB, is the proof.
func TestBuffers(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the kernel's doubling is Linux's")
	}
	const size = 8 << 10
	c, a := pair(t, &net.Dialer{Control: DialBuffers(size, size)})
	for _, opt := range []int{syscall.SO_RCVBUF, syscall.SO_SNDBUF} {
		if got := buffer(t, c, opt); got != 2*size {
			t.Errorf("dialled socket's option %d = %d, want %d", opt, got, 2*size)
		}
	}
	SetConnBuffer(a, syscall.SO_SNDBUF, size)
	if got := buffer(t, a, syscall.SO_SNDBUF); got != 2*size {
		t.Errorf("SetConnBuffer: SO_SNDBUF = %d, want %d", got, 2*size)
	}
}

// TestUnsentCounter: bytes written to a peer that does not read are
// counted as unsent; once the peer reads them all, none are.
func TestUnsentCounter(t *testing.T) {
	c, a := pair(t, &net.Dialer{Control: DialBuffers(4<<10, 4<<10)})
	unsent := UnsentCounter(c)
	if unsent == nil {
		if runtime.GOOS == "linux" {
			t.Fatal("no counter for a TCP connection on Linux")
		}
		t.Skip("SIOCOUTQ is Linux's")
	}
	SetConnBuffer(a, syscall.SO_RCVBUF, 4<<10)
	const total = 1 << 20
	c.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
	n, err := c.Write(make([]byte, total))
	if !errors.Is(err, syscall.EAGAIN) && !isTimeout(err) {
		t.Fatalf("write to a peer that does not read: %d bytes, %v; want a timeout", n, err)
	}
	if got := unsent(); got <= 0 || got > int64(n) {
		t.Fatalf("unsent = %d with %d bytes written and none read", got, n)
	}
	a.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(a, make([]byte, n)); err != nil {
		t.Fatal(err)
	}
	if got := unsent(); got != 0 {
		t.Errorf("unsent = %d after the peer read everything", got)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestSetLingerZero: a connection closed with linger 0 resets its peer
// instead of ending with FIN.
func TestSetLingerZero(t *testing.T) {
	c, a := pair(t, &net.Dialer{})
	SetLingerZero(c)
	c.Close()
	a.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := a.Read(make([]byte, 1))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("peer read after a linger-0 close: %v, want ECONNRESET (io.EOF is a FIN)", err)
	}
}
