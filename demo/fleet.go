package demo

import (
	"bufio"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"

	"github.com/sluice-proxy/sluice/internal/latency"
)

// --- the clients ---

// demoFleet is the demo's clients: fast ones that read everything and
// measure latency and gaps, and slow ones that freeze (see slowFreeze).
type demoFleet struct {
	url     string
	clients int
	slow    int
	freeze  time.Duration

	runLat  latency.Histogram                 // fast clients, whole run
	lastLat atomic.Pointer[latency.Histogram] // fast clients, since the last screen

	fastMsgs, fastGaps atomic.Uint64

	wakeCh  chan struct{} // closed when the load phase ends
	dialSem chan struct{} // bounds concurrent handshakes
	wg      sync.WaitGroup

	mu       sync.Mutex
	conns    map[net.Conn]struct{} // guarded by mu: open connections
	deadline time.Time             // guarded by mu: set by wake
	results  []clientResult        // guarded by mu
}

// clientResult is what one client saw.
type clientResult struct {
	slow       bool
	received   uint64
	gaps       uint64 // messages missing from the sequence
	maxLatency time.Duration
	outcome    string // how the connection ended, for the summary
}

func newDemoFleet(u string, o demoOptions, freeze time.Duration) *demoFleet {
	f := &demoFleet{
		url: u, clients: o.clients, slow: o.nSlow(), freeze: freeze,
		wakeCh: make(chan struct{}), dialSem: make(chan struct{}, 16),
		conns: make(map[net.Conn]struct{}),
	}
	f.lastLat.Store(new(latency.Histogram))
	return f
}

// start launches every client. Slow ones are spread over the fleet so
// they connect among the fast ones. Dials stop when ctx ends.
func (f *demoFleet) start(ctx context.Context) {
	for i := range f.clients {
		slow := f.slow > 0 && i*f.slow/f.clients != (i+1)*f.slow/f.clients
		f.wg.Add(1)
		go f.demoClient(ctx, slow)
	}
}

// wake ends the load phase for the clients: frozen ones read again, and
// every read gives up at deadline.
func (f *demoFleet) wake(deadline time.Time) {
	close(f.wakeCh)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.deadline = deadline
	for c := range f.conns {
		c.SetReadDeadline(deadline)
	}
}

func (f *demoFleet) wait() { f.wg.Wait() }

// clientConn is one client's connection: gobwas/ws, like the demo
// backend and sluice itself, so the proxy binary links one WebSocket
// library. Its reader answers pings and echoes a close, as browsers do.
type clientConn struct {
	net.Conn
	rd *wsutil.Reader
	// replies, when set, takes the reader's pongs and close echo to the
	// connection's writer goroutine (the flooder's), so that one goroutine
	// writes to the socket; unset, the reader writes them itself.
	replies chan<- []byte
}

// dialFeed connects one client to the feed at u: through sluice, or
// straight to the backend.
func dialFeed(ctx context.Context, u string, slow bool) (*clientConn, error) {
	nd := &net.Dialer{Timeout: 5 * time.Second}
	if slow {
		nd.Control = func(_, _ string, c syscall.RawConn) error {
			return setSockopts(c, sockopt{syscall.SOL_SOCKET, syscall.SO_RCVBUF, slowClientRcv},
				sockopt{syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, ethernetMSS})
		}
	}
	d := ws.Dialer{Timeout: 5 * time.Second, NetDial: nd.DialContext}
	c, br, _, err := d.Dial(ctx, u)
	if err != nil {
		return nil, err
	}
	// br holds what the server sent after its handshake response, if
	// anything; it reads on from c once that is used up.
	src := io.Reader(br)
	if br == nil {
		src = bufio.NewReaderSize(c, 4096)
	}
	cc := &clientConn{Conn: c}
	cc.rd = &wsutil.Reader{Source: src, State: ws.StateClientSide, OnIntermediate: cc.control}
	return cc, nil
}

// control handles a control frame whose header was just read; r reads its
// payload. A ping is answered with a pong; a close is echoed and ends the
// read with a wsutil.ClosedError. The close is parsed here rather than by
// wsutil.ControlHandler, whose check of the code predates 1012 to 1014 and
// would turn sluice's 1013 into an error.
func (c *clientConn) control(h ws.Header, r io.Reader) error {
	if h.Length > ws.MaxControlFramePayloadSize {
		return ws.ErrProtocolControlPayloadOverflow
	}
	p := make([]byte, h.Length)
	if _, err := io.ReadFull(r, p); err != nil {
		return err
	}
	switch h.OpCode {
	case ws.OpPing:
		c.reply(ws.NewPongFrame(p))
		return nil
	case ws.OpPong:
		return nil
	}
	code, reason := ws.ParseCloseFrameData(p)
	if len(p) < 2 {
		code = ws.StatusNoStatusRcvd
	}
	echo := ws.NewCloseFrame(ws.NewCloseFrameBody(code, ""))
	if len(p) < 2 {
		echo = ws.NewCloseFrame(nil)
	}
	c.reply(echo) // best effort: the read ends either way
	return wsutil.ClosedError{Code: code, Reason: reason}
}

// reply sends a control frame, masked as a client's must be, in one write.
func (c *clientConn) reply(f ws.Frame) {
	b := ws.MustCompileFrame(ws.MaskFrameInPlace(f))
	if c.replies == nil {
		c.Write(b)
		return
	}
	select {
	case c.replies <- b:
	default: // the writer is behind; a peer that waits for this reply times out
	}
}

// demoClient is one client's whole life.
func (f *demoFleet) demoClient(ctx context.Context, slow bool) {
	defer f.wg.Done()
	res := clientResult{slow: slow}
	defer func() {
		f.mu.Lock()
		f.results = append(f.results, res)
		f.mu.Unlock()
	}()
	select {
	case f.dialSem <- struct{}{}:
	case <-ctx.Done():
		res.outcome = "never connected (the run ended first)"
		return
	}
	c, err := dialFeed(ctx, f.url, slow)
	<-f.dialSem
	if err != nil {
		res.outcome = "could not connect: " + err.Error()
		if ctx.Err() != nil {
			res.outcome = "never connected (the run ended first)"
		}
		return
	}
	defer c.Close()
	f.mu.Lock()
	f.conns[c] = struct{}{}
	if !f.deadline.IsZero() {
		c.SetReadDeadline(f.deadline)
	}
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		delete(f.conns, c)
		f.mu.Unlock()
	}()

	var stamp [16]byte
	var last uint64
	frozen := false
	for {
		sent, seq, err := readStamped(c, stamp[:])
		if err != nil {
			res.outcome = closeOutcome(err)
			return
		}
		lat := time.Duration(time.Now().UnixNano() - sent)
		res.received++
		res.maxLatency = max(res.maxLatency, lat)
		var gap uint64
		if last != 0 && seq > last+1 {
			gap = seq - last - 1
		}
		res.gaps += gap
		last = max(last, seq)
		if !slow {
			f.fastMsgs.Add(1)
			f.fastGaps.Add(gap)
			f.runLat.Record(lat)
			f.lastLat.Load().Record(lat)
			continue
		}
		if frozen {
			continue
		}
		frozen = true
		freeze := time.NewTimer(f.freeze)
		select {
		case <-freeze.C:
		case <-f.wakeCh:
			freeze.Stop()
		}
	}
}

// readStamped reads one message and returns its send time and sequence
// number, discarding the padding. Control frames between messages are
// answered on the way; a close frame ends with a wsutil.ClosedError.
func readStamped(c *clientConn, stamp []byte) (sent int64, seq uint64, err error) {
	for {
		h, err := c.rd.NextFrame()
		if err != nil {
			return 0, 0, err
		}
		if h.OpCode.IsControl() {
			if err := c.control(h, c.rd); err != nil {
				return 0, 0, err
			}
			continue
		}
		if _, err := io.ReadFull(c.rd, stamp[:16]); err != nil {
			return 0, 0, err
		}
		if _, err := io.Copy(io.Discard, c.rd); err != nil {
			return 0, 0, err
		}
		// naive.HeaderLen: the sequence number, then the send time.
		return int64(binary.BigEndian.Uint64(stamp[8:16])), binary.BigEndian.Uint64(stamp[:8]), nil
	}
}

// closeOutcome describes how a client's connection ended.
func closeOutcome(err error) string {
	var ce wsutil.ClosedError
	if errors.As(err, &ce) {
		if ce.Code == ws.StatusAbnormalClosure {
			return outcome1006
		}
		s := fmt.Sprintf("closed with %d %s", ce.Code, closeCodeName(int(ce.Code)))
		if ce.Reason != "" {
			s += fmt.Sprintf(" (%q)", ce.Reason)
		}
		return s
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "no close frame before the demo's deadline"
	}
	return outcome1006
}

const outcome1006 = "cut without a close frame (1006)"

func closeCodeName(code int) string {
	switch code {
	case 1000:
		return "Normal Closure"
	case 1001:
		return "Going Away"
	case 1002:
		return "Protocol Error"
	case 1008:
		return "Policy Violation"
	case 1009:
		return "Message Too Big"
	case 1011:
		return "Internal Error"
	case 1012:
		return "Service Restart"
	case 1013:
		return "Try Again Later"
	case 1014:
		return "Bad Gateway"
	}
	return ""
}

// outcomeCounts tallies how connections ended.
type outcomeCounts map[string]int

func (c *outcomeCounts) add(outcome string) {
	if *c == nil {
		*c = outcomeCounts{}
	}
	(*c)[outcome]++
}

// String lists the outcomes, most frequent first: "5 closed with 1013 Try
// Again Later ("slow client"); 1 cut without a close frame (1006)".
func (c outcomeCounts) String() string {
	if len(c) == 0 {
		return "none"
	}
	keys := slices.SortedFunc(maps.Keys(c), func(a, b string) int {
		return cmp.Or(cmp.Compare(c[b], c[a]), cmp.Compare(a, b))
	})
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%d %s", c[k], k)
	}
	return strings.Join(parts, "; ")
}
