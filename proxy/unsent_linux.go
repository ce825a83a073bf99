//go:build linux

package proxy

import (
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// unsentCounter returns a function that tells how many bytes the kernel
// holds for conn that its peer has not acknowledged (SIOCOUTQ): memory
// sluice causes, which the client's queue counts (limiter.Queue.OnUnsent);
// and how many of those it has not even sent (SIOCOUTQNSD): bytes the
// peer's closed window holds back, which count toward its depth, whereas
// bytes in flight to a healthy peer far away do not. nil when conn has no
// socket to ask.
func unsentCounter(conn net.Conn) func() (unacked, unsent int64) {
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
	var unacked, unsent int
	ask := func(fd uintptr) {
		var err error
		if unacked, err = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ); err != nil {
			unacked = 0
		}
		if unsent, err = unix.IoctlGetInt(int(fd), unix.SIOCOUTQNSD); err != nil {
			unsent = 0
		}
	}
	return func() (int64, int64) {
		unacked, unsent = 0, 0
		if raw.Control(ask) != nil {
			return 0, 0 // closed: it holds nothing sluice still counts
		}
		return int64(unacked), int64(unsent)
	}
}
