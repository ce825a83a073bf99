// Package sockopt tunes the sockets of sluice's connections: the
// kernel's buffers for each socket, how a socket ends (FIN after the last
// bytes, or a reset that frees them at once), and what the kernel holds
// unsent (SIOCOUTQ, sockopt_linux.go). Package proxy's idle readers'
// epoll set is proxy's own (idle_linux.go).
package sockopt

import (
	"net"
	"syscall"
)

// setSocketBuffer sets opt (SO_RCVBUF or SO_SNDBUF) of the socket c to n
// bytes.
func setSocketBuffer(c syscall.RawConn, opt, n int) error {
	var serr error
	if err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, opt, n) }); err != nil {
		return err
	}
	return serr
}

// DialBuffers is a net.Dialer Control that sets SO_RCVBUF to rcv and
// SO_SNDBUF to snd (each unless 0) before the socket connects, so the
// window it advertises is small from the start and its send buffer never
// autotunes.
func DialBuffers(rcv, snd int) func(network, address string, c syscall.RawConn) error {
	return func(_, _ string, c syscall.RawConn) error {
		if rcv > 0 {
			if err := setSocketBuffer(c, syscall.SO_RCVBUF, rcv); err != nil {
				return err
			}
		}
		if snd > 0 {
			return setSocketBuffer(c, syscall.SO_SNDBUF, snd)
		}
		return nil
	}
}

// SetConnBuffer sets opt (SO_RCVBUF or SO_SNDBUF) of the socket under
// conn, a TLS connection's included. A failure keeps the kernel's
// default, which works: it is ignored.
func SetConnBuffer(conn net.Conn, opt, n int) {
	if tc, ok := conn.(interface{ NetConn() net.Conn }); ok {
		conn = tc.NetConn()
	}
	if sc, ok := conn.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			setSocketBuffer(raw, opt, n)
		}
	}
}

// SetLingerZero makes conn's close a reset, which frees what the kernel
// holds for it at once.
func SetLingerZero(conn net.Conn) {
	if tc, ok := conn.(interface{ NetConn() net.Conn }); ok {
		conn = tc.NetConn()
	}
	if tcp, ok := conn.(*net.TCPConn); ok {
		tcp.SetLinger(0)
	}
}
