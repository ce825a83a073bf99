package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gobwas/ws"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/frame"
	"github.com/sluice-proxy/sluice/internal/sockopt"
	"github.com/sluice-proxy/sluice/keepalive"
	"github.com/sluice-proxy/sluice/limiter"
)

// upstreamQueue bounds what waits for the upstream's socket: little, since
// the client's reader simply waits (and so pushes back on the client) while
// the upstream is slow to read. The Server's copy bounds a pause by
// UpstreamWriteTimeout: with what the kernel holds counted, a client may
// wait for a deaf backend with no write pending that could time out.
var upstreamQueue = limiter.Config{
	Policy:      limiter.Pause,
	MaxMessages: 8,
	MaxBytes:    256 << 10,
	LowWater:    0.5,
	KeepNewest:  1,
	ToUpstream:  true,
}

// leg is one side of a session: a socket, read through rd and written
// through w, its reader's state, and the queue w drains.
type leg struct {
	s     *session
	w     legWriter
	rd    *frame.Reader
	check frame.Checker      // owned by this leg's reader goroutine
	ka    *keepalive.Monitor // nil when keepalive is off for this leg
	// out holds the frames to write to conn; use queue(). The client
	// leg's is made with the session; the upstream leg's when first
	// needed, since an idle client sends nothing for the upstream: a
	// queue (192 B) less per idle session.
	out atomic.Pointer[limiter.Queue]

	// Parking (idle_linux.go): a reader whose socket stays quiet between
	// frames for idleGrace ends, leaving the socket in the server's epoll
	// set; the poller starts a reader again when it is readable. The
	// leg's key there is pollKey.
	reader func()           // this leg's reader goroutine, made once
	raw    syscall.RawConn  // nil: this leg's reader never parks
	arm    func(fd uintptr) // registers for one event, as armOp says; made at the first park; reader-owned

	// Counted by the reader of this leg, read after it has ended.
	msgsIn, bytesIn uint64

	// The small fields last and together: a session is 512 bytes, a
	// size class, only while they share words.
	parked   atomic.Bool // no reader runs; the next is started by wake
	upstream bool        // the leg toward the backend: frames sluice makes are masked
	armOp    int8        // EPOLL_CTL_ADD or _MOD; reader-owned
	skipRest bool        // dropping the frames left of a refused message; reader-owned
	served   int8        // how Frames ended the reading (readerNext: it did not); reader-owned
	// frameDeadline: upstreamFrameStart set a read deadline; reader-owned.
	frameDeadline bool

	// The leg's ending (close.go), guarded by s.mu.
	end         legState
	flushWanted bool // a close was queued or moved ahead under s.mu: unlock writes it
	sentCode    ws.StatusCode
	rcvdCode    ws.StatusCode
}

// pollKey is the leg's key in the epoll set: the session's id and the
// side.
func (l *leg) pollKey() uint64 {
	if l.upstream {
		return l.s.id<<1 | 1
	}
	return l.s.id << 1
}

func (l *leg) name() string {
	if l.upstream {
		return "upstream"
	}
	return "client"
}

// peer is the session's other leg.
func (l *leg) peer() *leg {
	if l.upstream {
		return &l.s.client
	}
	return &l.s.upstream
}

// finished: nothing more is expected on this leg. Callers hold s.mu.
func (l *leg) finished() bool {
	return l.end.lost() || (l.end.out == outWritten && l.end.in != inAwaited)
}

// SendPing implements keepalive.Peer: the ping goes on the priority lane.
func (l *leg) SendPing(payload []byte) {
	defer l.s.recoverTimer()
	if l.s.srv.opts.panicHook != nil {
		l.s.testPanic("timer")
	}
	seg := limiter.NewSegment(frame.MaxControlFrame)
	*seg.Buf = frame.AppendControl(*seg.Buf, ws.OpPing, payload, l.upstream)
	if !l.queue().PushPing(seg) {
		seg.Free() // closing, or the last ping is still unwritten
		return
	}
	// Written from the keepalive's timer goroutine through the leg's
	// writer, as a reader writes what it queues: no goroutine start per
	// connection per interval.
	l.w.flush()
	if l.upstream {
		l.s.srv.metrics.upstreamPingsSent.Inc()
	} else {
		l.s.srv.metrics.pingsSent.Inc()
	}
}

// Held tells the keepalive that sluice itself is not reading l's socket
// now: its frames wait for room in the other leg's queue, or an inbound
// limit holds them back. The peer's pong then waits in its own send
// buffer behind its data, and its deadline must not run out for that.
func (l *leg) Held() bool {
	// Held a moment ago counts too: the pong behind the backlog needs a
	// while to arrive once reading resumes.
	timeout := l.s.srv.opts.Keepalive.Timeout
	if l.upstream {
		timeout = l.s.srv.opts.UpstreamKeepalive.Timeout
	}
	if q := l.peer().out.Load(); q != nil && q.PausedWithin(timeout) {
		return true
	}
	return !l.upstream && l.s.rate != nil && l.s.rate.throttledNow(limiter.Now())
}

// Stale implements keepalive.Peer: the peer missed its pong deadline.
func (l *leg) Stale() {
	defer l.s.recoverTimer()
	if l.upstream {
		l.s.srv.metrics.upstreamPongMissed.Inc()
		l.s.end(causeUpstreamPongTimeout, nil)
		return
	}
	l.s.end(causePongTimeout, nil)
}

// session is one proxied pair. Up to four goroutines serve it: a reader
// per socket while it has bytes to read, and a writer goroutine per socket
// while what its queue holds waits for the socket (legWriter); a reader or
// timer writes what the socket takes at once itself. A reader parked in the epoll set counts as
// running. The last of them to end finishes the session.
type session struct {
	srv        *Server
	id         uint64
	began      int64 // limiter.Now() at the start: 8 bytes, where a time.Time takes 24
	clientAddr string

	client, upstream leg
	frames           frameWatch // client frame read timeout (read.go)
	// rate is the client's inbound limit state (ratelimit.go); nil
	// without limits. Owned by the client leg's reader.
	rate *clientRate

	mu         sync.Mutex
	closeTimer *time.Timer   // bounds the close handshake; guarded by mu
	hold       heldClose     // the client's close, waiting for the upstream's; guarded by mu
	ended      chan struct{} // closed at abort, for throttled readers; made on first use; guarded by mu
	endDetail  string        // the error or violation of endNote, if any; guarded by mu

	// running counts the goroutines serving the session; 0 once finished,
	// negative once wedged (panic.go).
	running atomic.Int32
	aborted bool    // guarded by mu
	cause   cause   // why sluice ended the session, if it did; guarded by mu
	endNote endNote // what first began the session's end; guarded by mu
}

// upgraded is what the front door (accept.go) hands the pair once both
// handshakes are done: the two sockets, the bytes each sent after its
// handshake, and what the session logs and checks frames against. The
// pair owns the sockets from then on.
type upgraded struct {
	client, upstream               net.Conn
	clientPending, upstreamPending []byte // copied by the frame readers
	clientAddr, target, protocol   string
	ext                            frame.Extension
}

// startSession makes the session of an upgraded pair and starts its
// upstream reader; the caller runs or starts the client's (clientReader,
// startReading).
func (s *Server) startSession(u *upgraded) *session {
	ss := &session{
		srv:        s,
		id:         s.nextID.Add(1),
		began:      limiter.Now(),
		clientAddr: u.clientAddr,
	}
	ss.client = leg{s: ss, rd: frame.NewReader(u.client, u.clientPending)}
	ss.upstream = leg{s: ss, upstream: true, rd: frame.NewReader(u.upstream, u.upstreamPending)}
	ss.client.w.l, ss.client.w.conn = &ss.client, u.client
	ss.upstream.w.l, ss.upstream.w.conn = &ss.upstream, u.upstream
	ss.client.check = frame.Checker{FromClient: true, Extension: u.ext, MaxFrame: s.opts.MaxFrameBytes, MaxMessage: s.opts.MaxMessageBytes}
	ss.upstream.check = frame.Checker{FromClient: false, Extension: u.ext}
	cq := limiter.NewQueue(&s.opts.Queue, s.budget, ss.guardEvict)
	if f := sockopt.UnsentCounter(u.client); f != nil {
		// What the kernel holds unsent for the client counts as queued:
		// sampled by the Budget's guard, never per frame.
		cq.OnUnsent(f)
	}
	ss.client.out.Store(cq)
	ss.rate = s.newClientRate()

	ss.client.reader, ss.upstream.reader = ss.clientReader, ss.upstreamReader
	if s.idle != nil {
		ss.client.raw, ss.upstream.raw = ss.client.rd.RawConn(), ss.upstream.rd.RawConn()
	}
	// Writers run only while their queue has work (legWriter.kick,
	// flush), readers only while their socket has bytes: an idle session
	// is no goroutine at all.
	// The readers count as running from here, so that a keepalive ping or
	// a drain can start a writer before they do.
	ss.running.Store(2)
	if s.opts.Keepalive.Interval > 0 {
		ss.client.ka = keepalive.Start(s.opts.Keepalive, &ss.client)
	}
	if s.opts.UpstreamKeepalive.Interval > 0 {
		ss.upstream.ka = keepalive.Start(s.opts.UpstreamKeepalive, &ss.upstream)
	}

	// Fully built: only now may Shutdown see it.
	s.mu.Lock()
	s.sessions[ss] = struct{}{}
	s.mu.Unlock()
	s.metrics.connectionsActive.Inc()
	s.settle.setUp()
	ss.event(s.log.Info()).Str("upstream", s.logURL(u.target)).Str("protocol", u.protocol).Msg("session open")
	if s.closing.Load() {
		// Shutdown may have listed the sessions before this one joined.
		ss.goAway()
	}
	ss.upstream.startReading()
	return ss
}

// age is how long the session has run.
func (s *session) age() time.Duration { return time.Duration(limiter.Now() - s.began) }

// event adds the session's identity to a log line. A per-session
// sub-logger would hold its own buffer for the session's whole life.
func (s *session) event(e *zerolog.Event) *zerolog.Event {
	return e.Uint64("conn", s.id).Str("client", s.clientAddr)
}

// setReadDeadline bounds the reader's next wait on l's socket.
func (l *leg) setReadDeadline(t time.Time) { l.w.conn.SetReadDeadline(t) }

// enter counts a new writer goroutine in, unless the session has already
// finished.
func (s *session) enter() bool {
	for {
		n := s.running.Load()
		if n <= 0 {
			return false // finished, or wedged
		}
		if s.running.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// exit is deferred by each goroutine; the last one finishes the session.
// A wedged session's count stays negative: it never finishes this way.
func (s *session) exit() {
	if s.running.Add(-1) != 0 {
		return
	}
	s.abort(noteNone)
	s.srv.idle.forget(&s.client)
	s.srv.idle.forget(&s.upstream)
	s.client.rd.Release()
	s.upstream.rd.Release()
	m := s.srv.metrics
	m.connectionsActive.Dec()
	d := s.age()
	m.sessionSeconds.Observe(d.Seconds())
	s.mu.Lock()
	reason, c := s.endNote.text(s.cause, s.endDetail), s.cause
	s.mu.Unlock()
	ev := s.event(s.srv.log.Info())
	if endings[c].eviction {
		ev = ev.Str("evicted", endings[c].label)
	}
	ev.Str("reason", reason).
		Float64("duration_seconds", d.Seconds()).
		Int("client_close_sent", int(s.client.sentCode)).
		Int("client_close_received", int(s.client.rcvdCode)).
		Int("upstream_close_sent", int(s.upstream.sentCode)).
		Int("upstream_close_received", int(s.upstream.rcvdCode)).
		Uint64("msgs_to_upstream", s.client.msgsIn).
		Uint64("bytes_to_upstream", s.client.bytesIn).
		Uint64("msgs_to_client", s.upstream.msgsIn).
		Uint64("bytes_to_client", s.upstream.bytesIn).
		Msg("session closed")
	s.srv.forget(s)
}

func errString(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "EOF"
	case errors.Is(err, net.ErrClosed):
		return "closed"
	}
	return err.Error()
}
