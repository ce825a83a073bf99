//go:build linux

package sockopt

import (
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// UnsentCounter returns a function that tells how many bytes the kernel
// holds for conn that its peer has not acknowledged (SIOCOUTQ): memory
// sluice causes, which the client's queue counts (limiter.Queue.OnUnsent).
// nil when conn has no socket to ask.
func UnsentCounter(conn net.Conn) func() int64 {
	if tc, ok := conn.(interface{ NetConn() net.Conn }); ok {
		conn = tc.NetConn()
	}
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	var n int
	ask := func(fd uintptr) {
		var err error
		if n, err = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ); err != nil {
			n = 0
		}
	}
	return func() int64 {
		n = 0
		if raw.Control(ask) != nil {
			return 0 // closed: it holds nothing sluice still counts
		}
		return int64(n)
	}
}
