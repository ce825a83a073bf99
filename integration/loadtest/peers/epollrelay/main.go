// Command epollrelay is gotunnel without Go's net package: descriptors
// owned directly, non-blocking accept, connect, read and write on one epoll
// set per CPU (HAProxy runs a thread per CPU here), no goroutine per
// connection, and, as HAProxy, no read that can only fail: a short read
// means the socket is empty, and the next bytes are a new edge. The epoll
// sets are waited on through Go's netpoller, as sluice's idle poller is.
// It parses nothing either, so beside gotunnel it measures what owning the
// descriptors would save sluice per upgrade, and beside HAProxy what Go's
// runtime still costs:
//
//	go run ./integration/loadtest -mode handshakes -compare 'cmd:sh integration/loadtest/peers/go.sh epollrelay,cmd:sh integration/loadtest/peers/go.sh gotunnel,cmd:sh integration/loadtest/peers/haproxy.sh'
//
// It listens on $PROXY_LISTEN and dials $BACKEND_ADDR, as every cmd target.
// A measuring tool, not a proxy: it holds at most relayBuf bytes per
// direction and speaks IPv4 only.
package main

import (
	"log"
	"net/netip"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

const relayBuf = 16 << 10

// side is one socket of a relayed pair and what waits to be written to it.
type side struct {
	fd      int
	peer    *side
	pending []byte // read from peer, not yet written here
	eof     bool   // this socket's peer has sent FIN, passed on to peer
	hup     bool   // the socket's FIN or error is known: read to its end
	closed  bool
	buf     [relayBuf]byte
}

type loop struct {
	epfd, lfd int
	backend   unix.SockaddrInet4
	sides     map[int]*side
}

func main() {
	listen := netip.MustParseAddrPort(os.Getenv("PROXY_LISTEN"))
	backend := netip.MustParseAddrPort(os.Getenv("BACKEND_ADDR"))
	for range runtime.NumCPU() {
		l := &loop{sides: make(map[int]*side), backend: unix.SockaddrInet4{Port: int(backend.Port()), Addr: backend.Addr().As4()}}
		l.listen(listen)
		go l.run()
	}
	select {} // the loops run until the harness stops the process
}

func (l *loop) listen(a netip.AddrPort) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	check(err)
	check(unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1))
	check(unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1))
	check(unix.Bind(fd, &unix.SockaddrInet4{Port: int(a.Port()), Addr: a.Addr().As4()}))
	check(unix.Listen(fd, 4096))
	l.lfd = fd
	l.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	check(err)
	check(unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)}))
}

// run waits for the epoll set through Go's netpoller, as sluice's idle
// poller does: a thread blocked in epoll_wait would have the runtime hand
// its P around and spin on every wake-up.
func (l *loop) run() {
	check(unix.SetNonblock(l.epfd, true))
	raw, err := os.NewFile(uintptr(l.epfd), "epoll").SyscallConn()
	check(err)
	events := make([]unix.EpollEvent, 256)
	raw.Read(func(fd uintptr) bool {
		for {
			n, err := unix.EpollWait(int(fd), events, 0)
			if err == unix.EINTR {
				continue
			}
			check(err)
			if n == 0 {
				return false
			}
			for _, ev := range events[:n] {
				l.handle(ev)
			}
		}
	})
}

func (l *loop) handle(ev unix.EpollEvent) {
	fd := int(ev.Fd)
	if fd == l.lfd {
		l.accept()
		return
	}
	s := l.sides[fd]
	if s == nil {
		return
	}
	if ev.Events&unix.EPOLLOUT != 0 && len(s.pending) > 0 {
		l.flush(s)
	}
	if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		s.hup = ev.Events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0
		l.read(s)
	}
}

func (l *loop) accept() {
	for {
		cfd, _, err := unix.Accept4(l.lfd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		if err != nil {
			return // EAGAIN, or a connection gone before it was taken
		}
		ufd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			unix.Close(cfd)
			continue
		}
		if err := unix.Connect(ufd, &l.backend); err != nil && err != unix.EINPROGRESS {
			unix.Close(cfd)
			unix.Close(ufd)
			continue
		}
		unix.SetsockoptInt(cfd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
		unix.SetsockoptInt(ufd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
		c, u := &side{fd: cfd}, &side{fd: ufd}
		c.peer, u.peer = u, c
		l.sides[cfd], l.sides[ufd] = c, u
		// Edge-triggered, both ways, registered once: what is read is
		// written at once, and EPOLLOUT matters only while pending.
		ev := unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET
		unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, cfd, &unix.EpollEvent{Events: uint32(ev), Fd: int32(cfd)})
		unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, ufd, &unix.EpollEvent{Events: uint32(ev), Fd: int32(ufd)})
	}
}

// read moves what s's socket has to its peer, until the socket is empty,
// the peer's buffer is full, or the socket ends.
func (l *loop) read(s *side) {
	for !s.closed && len(s.peer.pending) == 0 && !s.peer.eof {
		n, err := unix.Read(s.fd, s.buf[:])
		switch {
		case err == unix.EAGAIN:
			return
		case err == unix.EINTR:
			continue
		case err != nil || n == 0:
			s.peer.eof = true
			if len(s.peer.pending) == 0 {
				unix.Shutdown(s.peer.fd, unix.SHUT_WR)
			}
			l.maybeClose(s)
			return
		}
		s.peer.pending = s.buf[:n]
		l.flush(s.peer)
		if n < len(s.buf) && !s.hup {
			// A short read emptied the socket: the next bytes are a new
			// edge, so no read that would only fail (as HAProxy).
			return
		}
	}
}

// flush writes what waits for s, then reads on from its peer if that
// made room.
func (l *loop) flush(s *side) {
	for len(s.pending) > 0 {
		n, err := unix.Write(s.fd, s.pending)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			if err != unix.EAGAIN {
				s.pending = nil
				l.closePair(s)
			}
			return
		}
		s.pending = s.pending[n:]
	}
	s.pending = nil
	if s.eof {
		unix.Shutdown(s.fd, unix.SHUT_WR)
		l.maybeClose(s)
		return
	}
	l.read(s.peer)
}

// maybeClose closes the pair once both directions have ended.
func (l *loop) maybeClose(s *side) {
	if s.eof && s.peer.eof {
		l.closePair(s)
	}
}

func (l *loop) closePair(s *side) {
	for _, x := range []*side{s, s.peer} {
		if !x.closed {
			x.closed = true
			delete(l.sides, x.fd)
			unix.Close(x.fd)
		}
	}
}

func check(err error) {
	if err != nil {
		log.Fatal(err)
	}
}
