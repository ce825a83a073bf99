//go:build linux

package proxy

import (
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// idlePoller holds the sockets whose readers have parked: a reader whose
// socket stays quiet between frames for idleGrace registers the socket here
// (one-shot) and its goroutine ends, so an idle session costs no
// goroutine and no stack. When a socket becomes readable the poller
// starts a reader for it again. The epoll set is itself waited on through
// Go's netpoller, as a non-blocking *os.File, so the poller needs no
// thread of its own either.
type idlePoller struct {
	epfd int
	file *os.File // epfd, for the netpoller
	raw  syscall.RawConn
	done chan struct{}

	mu   sync.Mutex
	legs map[uint64]*leg // registered legs by poll id; guarded by mu
}

// pollBatch is how many readiness events one epoll_wait takes.
const pollBatch = 256

func newIdlePoller() (*idlePoller, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("fcntl", err)
	}
	f := os.NewFile(uintptr(fd), "epoll")
	raw, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	p := &idlePoller{epfd: fd, file: f, raw: raw, done: make(chan struct{}), legs: make(map[uint64]*leg)}
	go p.run()
	return p, nil
}

// run wakes parked readers until close.
func (p *idlePoller) run() {
	defer close(p.done)
	events := make([]unix.EpollEvent, pollBatch)
	ready := make([]*leg, 0, pollBatch)
	// The callback returns false to wait (in the netpoller) for the epoll
	// set to become readable, and true only when it broke.
	p.raw.Read(func(fd uintptr) bool {
		for {
			n, err := unix.EpollWait(int(fd), events, 0)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return true
			}
			p.mu.Lock()
			for _, ev := range events[:n] {
				if l := p.legs[eventID(&ev)]; l != nil {
					ready = append(ready, l)
				}
			}
			p.mu.Unlock()
			for i, l := range ready {
				l.wake()
				ready[i] = nil
			}
			ready = ready[:0]
			if n < len(events) {
				return false
			}
		}
	})
}

// park registers l's socket for one readiness event and reports whether
// l's reader may end: the poller, or an abort, starts the next one. Only
// l's reader calls it.
func (p *idlePoller) park(l *leg) bool {
	if p == nil || l.raw == nil {
		return false
	}
	l.armOp = unix.EPOLL_CTL_MOD
	if l.arm == nil {
		l.armOp = unix.EPOLL_CTL_ADD
		p.mu.Lock()
		p.legs[l.pollKey()] = l
		p.mu.Unlock()
		// Made once, and before arming (the next reader may run before
		// Control returns): a closure per park would allocate. Once
		// made, the leg is registered.
		l.arm = func(fd uintptr) { p.arm(l, fd) }
	}
	// Inside Control the descriptor cannot be closed and its number
	// reused by another socket under us.
	if err := l.raw.Control(l.arm); err != nil {
		return false // the socket is closed: read on, to find out
	}
	return true
}

// arm runs inside Control for park. From the moment the leg is marked
// parked, the next reader may start (an abort) and, once epoll_ctl
// succeeds, the poller may start it: nothing here, nor in park after
// it, may touch l again, unless it takes the leg back first.
func (p *idlePoller) arm(l *leg, fd uintptr) {
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT}
	setEventID(&ev, l.pollKey())
	op := int(l.armOp)
	// Parked before armed: the event may come at once. Level-triggered
	// arming reports bytes that arrived since the reader last looked, so
	// no wake-up is lost between the two.
	l.parked.Store(true)
	err := unix.EpollCtl(p.epfd, op, int(fd), &ev)
	if err == nil || !l.parked.CompareAndSwap(true, false) {
		return // armed, or an abort has started the next reader
	}
	// No event will come: the next reader waits in its goroutine, for
	// good.
	l.raw = nil
	l.s.event(l.s.srv.log.Warn()).Str("leg", l.name()).Err(err).Msg("epoll_ctl failed: this socket's reader waits in a goroutine")
	go l.reader()
}

// forget drops l's registration; a closed socket has already left the
// epoll set, and events still in flight for it find nothing.
func (p *idlePoller) forget(l *leg) {
	if p == nil || l.arm == nil {
		return
	}
	p.mu.Lock()
	delete(p.legs, l.pollKey())
	p.mu.Unlock()
}

// close stops the poller once no session is left to wake.
func (p *idlePoller) close() {
	if p == nil {
		return
	}
	p.file.Close()
	<-p.done
}

func eventID(ev *unix.EpollEvent) uint64 {
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}

func setEventID(ev *unix.EpollEvent, id uint64) {
	ev.Fd, ev.Pad = int32(uint32(id)), int32(uint32(id>>32))
}
