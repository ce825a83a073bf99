package integration

// The hostile-input catalogue: what a client that breaks the rules can send
// to sluice, byte for byte, and the answer it must get. Every case runs
// against one in-process sluice in front of a gorilla echo backend, while a
// well-behaved neighbour session exchanges a message every 20 ms through the
// same sluice; a case passes only if the neighbour kept going across it and
// the backend saw what the README's close-code table promises (1001 on the
// upstream leg of a session the client broke, no upstream connection at all
// for a request that sluice refuses).
//
// The idle-sockets case opens 1,000 sockets that never send a byte. Run it
// at full size by hand (it needs `ulimit -n` of at least 2×n+1000):
//
//	go test -race -count=1 -run 'TestCatalogue/idle_sockets' ./integration/ -catalogue.sockets=10000
//
// or CATALOGUE_SOCKETS=10000.

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gobwas/ws"
	gorilla "github.com/gorilla/websocket"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/internal/wstest"
	"github.com/sluice-proxy/sluice/proxy"
)

var catSockets = flag.Int("catalogue.sockets", 0,
	"idle sockets the catalogue's idle_sockets case opens (default 1000, or $CATALOGUE_SOCKETS); 10000 for the full case")

// The catalogue's sluice limits (SLUICE_MAX_FRAME_BYTES,
// SLUICE_MAX_MESSAGE_BYTES, SLUICE_HANDSHAKE_TIMEOUT). MaxHeaderBytes is the
// default, 32 KiB; sluice allows 4 KiB more before it answers 431, as
// net/http did.
const (
	catMaxFrame         = 64 << 10
	catMaxMessage       = 128 << 10
	catHandshakeTimeout = 500 * time.Millisecond
	catMaxHeaderBytes   = 32 << 10
)

// catWait bounds every read, write and wait of the catalogue.
const catWait = 5 * time.Second

// Upstream expectations of a case.
const (
	catNoUpstream  = -1 // sluice must not have dialled the backend for it
	catAnyUpstream = 0  // not checked (no id, or the case checks itself)
)

// catCase is one hostile input and the answer it must get. Exactly one of
// request, frames and script says what the client does; status and code
// say what it must get back (a script checks for itself and says so in
// want).
type catCase struct {
	name string
	// request builds the raw bytes of an HTTP exchange for the connection
	// id, addressed to host.
	request func(host, id string) []byte
	// frames are written after a proper handshake (gobwas ws.Dialer on a
	// raw net.Conn).
	frames []byte
	// script runs a case that needs more than one write; it returns what
	// it saw, or fails the test.
	script func(t *testing.T, e *catEnv, id string) string

	status int           // the HTTP status expected for request
	header [][2]string   // headers the response must carry
	echo   bool          // status 101: an echo must work, then the client vanishes
	code   ws.StatusCode // the close code expected after frames
	want   string        // the expectation in words, for script cases

	// upstream is the close code the backend must see on this client's
	// upstream leg, or catNoUpstream or catAnyUpstream.
	upstream int
}

func (c catCase) expected() string {
	var s string
	switch {
	case c.want != "":
		s = c.want
	case c.code != 0:
		s = fmt.Sprintf("close %d", c.code)
	case c.echo:
		s = fmt.Sprintf("%d + echo", c.status)
	default:
		s = strconv.Itoa(c.status)
	}
	switch c.upstream {
	case catNoUpstream:
		s += "; no upstream dial"
	case catAnyUpstream:
	default:
		s += fmt.Sprintf("; upstream %d", c.upstream)
	}
	return s
}

// TestCatalogue runs every hostile case of the catalogue against one sluice.
func TestCatalogue(t *testing.T) {
	e := catSetup(t)
	cases := catCases()
	type row struct{ name, want, got string }
	var rows []row
	for i, c := range cases {
		id := fmt.Sprintf("cat%d", i)
		got, ran := "(failed before an answer)", false
		ok := t.Run(c.name, func(t *testing.T) {
			ran = true
			before := e.neighbour.progress(t)
			got = e.run(t, c, id)
			if c.upstream > 0 || c.upstream == catNoUpstream {
				got += "; " + e.checkUpstream(t, c, id)
			}
			e.neighbour.madeProgress(t, before)
			e.panics.check(t)
		})
		if !ran {
			continue // filtered out by -run
		}
		if !ok {
			got += " [FAIL]"
		}
		rows = append(rows, row{c.name, c.expected(), got})
	}

	var b strings.Builder
	fmt.Fprintf(&b, "catalogue: %d cases\n", len(rows))
	for _, r := range rows {
		fmt.Fprintf(&b, "  %-44s  want %-42s  got %s\n", r.name, r.want, r.got)
	}
	t.Log(b.String())
	n := e.neighbour.progress(t)
	t.Logf("neighbour: %d echoes, slowest %v", n, time.Duration(e.neighbour.slowest.Load()))

	// Every session, handler and idle socket of the cases is gone.
	e.settleGoroutines(t, "after the last case")
}

// catCases is the catalogue.
func catCases() []catCase {
	var cs []catCase
	closeCase := func(name string, code ws.StatusCode, frames ...[]byte) {
		cs = append(cs, catCase{name: name, frames: bytes.Join(frames, nil), code: code, upstream: 1001})
	}
	status := func(name string, st int, req func(host, id string) []byte, header ...[2]string) {
		cs = append(cs, catCase{name: name, request: req, status: st, header: header, upstream: catNoUpstream})
	}
	upgradeRequired := [][2]string{{"Upgrade", "websocket"}, {"Sec-WebSocket-Version", "13"}}

	// --- frames after a proper handshake --------------------------------
	closeCase("unmasked frame", 1002, catFrame(true, 0, ws.OpText, []byte("hello"), false))
	// A 64-bit length word with its top bit set; no payload follows.
	closeCase("64-bit length with the top bit set", 1002,
		[]byte{0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4})
	// The frame announces 100 KiB and not one payload byte is sent: the
	// close must come from the header alone.
	closeCase("declared length over MaxFrameBytes, unsent", 1009,
		catHeader(ws.Header{Fin: true, OpCode: ws.OpBinary, Length: 100 << 10}))
	closeCase("control frame of 126 bytes", 1002, catFrame(true, 0, ws.OpPing, bytes.Repeat([]byte("p"), 126), true))
	closeCase("fragmented ping", 1002, catFrame(false, 0, ws.OpPing, []byte("ping"), true))
	closeCase("continuation without a start", 1002, catFrame(true, 0, ws.OpContinuation, []byte("tail"), true))
	closeCase("text frame inside a fragmented message", 1002,
		catFrame(false, 0, ws.OpText, []byte("start"), true),
		catFrame(true, 0, ws.OpText, []byte("again"), true))
	for _, op := range []ws.OpCode{3, 4, 5, 6, 7, 11, 12, 13, 14, 15} {
		closeCase(fmt.Sprintf("reserved opcode %d", op), 1002, catFrame(true, 0, op, []byte("x"), true))
	}
	for i, rsv := range []byte{4, 2, 1} {
		closeCase(fmt.Sprintf("RSV%d without an extension", i+1), 1002, catFrame(true, rsv, ws.OpText, []byte("x"), true))
	}
	closeCase("close with a 1-byte payload", 1002, catFrame(true, 0, ws.OpClose, []byte{0x03}, true))
	for _, code := range []ws.StatusCode{0, 999, 1004, 1005, 1006, 1015, 2999, 5000} {
		closeCase(fmt.Sprintf("close code %d", code), 1002, catFrame(true, 0, ws.OpClose, catClosePayload(code, "bye"), true))
	}
	closeCase("close reason not UTF-8", 1007, catFrame(true, 0, ws.OpClose, catClosePayload(1000, "ok\xff\xfe"), true))
	// Three 60 KiB fragments: each under MaxFrameBytes, together over
	// MaxMessageBytes. The third is announced and never sent.
	chunk := bytes.Repeat([]byte("m"), 60<<10)
	closeCase("message over MaxMessageBytes across fragments", 1009,
		catFrame(false, 0, ws.OpBinary, chunk, true),
		catFrame(false, 0, ws.OpContinuation, chunk, true),
		catHeader(ws.Header{Fin: true, OpCode: ws.OpContinuation, Length: 60 << 10}))

	// --- the handshake ----------------------------------------------------
	// sluice reads up to MaxHeaderBytes+4096 of request line and headers,
	// as net/http did, and answers anything longer with 431; no separate limit
	// on the request line (no 414) nor on the number of headers.
	status("header bomb: one 100 KiB value", 431, func(host, id string) []byte {
		return catUpgrade(host, id, nil, "X-Bomb: "+strings.Repeat("b", 100<<10))
	})
	status("header bomb: 10,000 headers", 431, func(host, id string) []byte {
		extra := make([]string, 10000)
		for i := range extra {
			extra[i] = fmt.Sprintf("X-H%d: v", i)
		}
		return catUpgrade(host, id, nil, extra...)
	})
	status("request line of 40 KiB", 431, func(host, id string) []byte {
		return catRaw("GET /echo?id="+id+"&pad="+strings.Repeat("a", 40<<10)+" HTTP/1.1", catUpgradeHeaders(host, nil)...)
	})
	cs = append(cs, catCase{
		name: "request line of 9 KiB (under MaxHeaderBytes)",
		request: func(host, id string) []byte {
			return catRaw("GET /echo?id="+id+"&pad="+strings.Repeat("a", 9<<10)+" HTTP/1.1", catUpgradeHeaders(host, nil)...)
		},
		status: 101, echo: true, upstream: 1001,
	})
	status("missing Sec-WebSocket-Key", 400, func(host, id string) []byte {
		return catUpgrade(host, id, []string{"Sec-WebSocket-Key"})
	})
	status("Sec-WebSocket-Key of 10 bytes", 400, func(host, id string) []byte {
		return catUpgrade(host, id, []string{"Sec-WebSocket-Key"}, "Sec-WebSocket-Key: dGhlIHNhbXBsZQ==")
	})
	status("Sec-WebSocket-Key not base64", 400, func(host, id string) []byte {
		return catUpgrade(host, id, []string{"Sec-WebSocket-Key"}, "Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==")
	})
	status("two Sec-WebSocket-Key headers", 400, func(host, id string) []byte {
		return catUpgrade(host, id, nil, "Sec-WebSocket-Key: "+wstest.NewKey())
	})
	status("missing Sec-WebSocket-Version", 426, func(host, id string) []byte {
		return catUpgrade(host, id, []string{"Sec-WebSocket-Version"})
	}, upgradeRequired...)
	status("Sec-WebSocket-Version 8", 426, func(host, id string) []byte {
		return catUpgrade(host, id, []string{"Sec-WebSocket-Version"}, "Sec-WebSocket-Version: 8")
	}, upgradeRequired...)
	status("Upgrade: websocketx", 426, func(host, id string) []byte {
		return catUpgrade(host, id, []string{"Upgrade"}, "Upgrade: websocketx")
	}, upgradeRequired...)
	status("Upgrade: h2c", 426, func(host, id string) []byte {
		return catUpgrade(host, id, []string{"Upgrade"}, "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA")
	}, upgradeRequired...)
	status("Connection: keep-alive, no upgrade token", 400, func(host, id string) []byte {
		return catUpgrade(host, id, []string{"Connection"}, "Connection: keep-alive")
	})
	status("POST upgrade", 405, func(host, id string) []byte {
		return catRaw("POST /echo?id="+id+" HTTP/1.1", append(catUpgradeHeaders(host, nil), "Content-Length: 0")...)
	})
	status("HTTP/1.0 upgrade", 400, func(host, id string) []byte {
		return catRaw("GET /echo?id="+id+" HTTP/1.0", catUpgradeHeaders(host, nil)...)
	})
	status("plain GET without Upgrade", 426, func(host, id string) []byte {
		return catRaw("GET /echo?id="+id+" HTTP/1.1", "Host: "+host)
	}, upgradeRequired...)
	status("garbage instead of a request", 400, func(host, id string) []byte {
		return []byte("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
	})
	// Upgrade and Connection are token lists (RFC 9110 §7.8, §7.6.1): two
	// fields are one list. frontdoor.CheckUpgrade accepts a list that
	// holds the token, so the upgrade must succeed whichever field comes
	// first, or be refused before the backend is dialled.
	cs = append(cs, catCase{
		name: "duplicate Upgrade: websocket, then h2c",
		request: func(host, id string) []byte {
			return catUpgrade(host, id, nil, "Upgrade: h2c")
		},
		status: 101, echo: true, upstream: 1001,
	}, catCase{
		name: "duplicate Upgrade: h2c, then websocket",
		request: func(host, id string) []byte {
			return catUpgrade(host, id, []string{"Upgrade"}, "Upgrade: h2c", "Upgrade: websocket")
		},
		status: 101, echo: true, upstream: 1001,
	}, catCase{
		name: "Upgrade: h2c, websocket (one field)",
		request: func(host, id string) []byte {
			return catUpgrade(host, id, []string{"Upgrade"}, "Upgrade: h2c, websocket")
		},
		status: 101, echo: true, upstream: 1001,
	}, catCase{
		name: "duplicate Connection: keep-alive, then Upgrade",
		request: func(host, id string) []byte {
			return catUpgrade(host, id, []string{"Connection"}, "Connection: keep-alive", "Connection: Upgrade")
		},
		status: 101, echo: true, upstream: 1001,
	})
	// RFC 6455 §4.1 wants the server's authority in Host; an empty one is
	// a bad request, to be refused before the backend is dialled.
	status("no Host", 400, func(host, id string) []byte {
		return catRaw("GET /echo?id="+id+" HTTP/1.1", catUpgradeHeaders(host, []string{"Host"})...)
	})
	status("empty Host", 400, func(host, id string) []byte {
		return catRaw("GET /echo?id="+id+" HTTP/1.1", catUpgradeHeaders("", nil)...)
	})

	// --- scripts ----------------------------------------------------------
	cs = append(cs, catCase{
		name:     "pipelined frame in the upgrade's write",
		script:   catPipelined(1),
		want:     "101, then the echo of the pipelined frame",
		upstream: 1001,
	}, catCase{
		name:     "pipelined frames past the HTTP read buffer",
		script:   catPipelined(12),
		want:     "101, then the echo of all 12 frames",
		upstream: 1001,
	}, catCase{
		name:     "slowloris: a header byte every 100ms",
		script:   catSlowloris,
		want:     fmt.Sprintf("400 or closed within 2×%v", catHandshakeTimeout),
		upstream: catNoUpstream,
	}, catCase{
		name:   "idle_sockets",
		script: catIdleSockets,
		want:   fmt.Sprintf("each closed within 2×%v", catHandshakeTimeout),
	})
	return cs
}

// --- the environment ---------------------------------------------------------

// catEnv is the catalogue's world: backend, sluice, neighbour.
type catEnv struct {
	backend   *catBackend
	srv       *proxy.Server
	addr      string
	neighbour *catNeighbour
	panics    *catPanicWatch
	baseline  int // goroutines with the neighbour running and no case
}

func catSetup(t *testing.T) *catEnv {
	e := &catEnv{panics: catWatchPanics(t)}
	e.backend = catStartBackend(t)
	s := startSluice(t, e.backend.url, func(o *proxy.Options) {
		o.Logger = zerolog.New(e.panics).Level(zerolog.WarnLevel)
		// The catalogue checks what sluice refuses: plain requests get 426
		// here, not the backend's answer (passthrough_test.go).
		o.HTTPPassThrough = false
		o.HandshakeTimeout = catHandshakeTimeout
		o.MaxHeaderBytes = catMaxHeaderBytes
		o.MaxFrameBytes = catMaxFrame
		o.MaxMessageBytes = catMaxMessage
	})
	e.srv, e.addr = s.srv, s.addr
	e.neighbour = catStartNeighbour(t, "ws://"+e.addr, e.backend)
	// Let the neighbour and both servers reach their steady state.
	e.neighbour.madeProgress(t, e.neighbour.progress(t))
	e.baseline = runtime.NumGoroutine()
	return e
}

// run plays one case and returns what it saw.
func (e *catEnv) run(t *testing.T, c catCase, id string) string {
	switch {
	case c.script != nil:
		return c.script(t, e, id)
	case c.frames != nil:
		return e.runFrames(t, c, id)
	default:
		return e.runRequest(t, c, id)
	}
}

// runFrames handshakes properly, sends the case's frames and reads until
// sluice's close frame, which must carry the expected code; then sluice
// must close the socket.
func (e *catEnv) runFrames(t *testing.T, c catCase, id string) string {
	conn, br := catDialGobwas(t, e.addr, id)
	catWriteAll(t, conn, c.frames)
	code, reason, err := catReadClose(conn, br)
	if err != nil {
		t.Fatalf("no close frame: %v", err)
	}
	got := fmt.Sprintf("close %d %q", code, reason)
	if code != c.code {
		t.Errorf("close code = %d %q, want %d", code, reason, c.code)
	}
	if err := catExpectEOF(conn, br); err != nil {
		t.Errorf("after the close frame: %v", err)
	}
	return got
}

// runRequest writes the case's request and reads the answer.
func (e *catEnv) runRequest(t *testing.T, c catCase, id string) string {
	x := catExchange(t, e.addr, c.request(e.addr, id))
	defer x.close()
	if x.resp == nil {
		got := "connection closed, no answer"
		if x.err != nil && !catIsClosed(x.err) {
			got = "no answer: " + x.err.Error()
		}
		t.Errorf("got %s, want status %d", got, c.status)
		return got
	}
	resp := x.resp
	got := strconv.Itoa(resp.StatusCode)
	if resp.StatusCode != c.status {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		t.Errorf("status = %s (%q), want %d", resp.Status, body, c.status)
		return got
	}
	for _, h := range c.header {
		if v := resp.Header.Get(h[0]); !strings.EqualFold(v, h[1]) {
			t.Errorf("%s = %q, want %q", h[0], v, h[1])
		}
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		// Refusals close the connection: sluice keeps no HTTP state.
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		if err := catExpectEOF(x.conn, x.br); err != nil {
			t.Errorf("after the %d: %v", resp.StatusCode, err)
		}
		return got
	}
	if c.echo {
		msg := catFrame(true, 0, ws.OpText, []byte("echo "+id), true)
		catWriteAll(t, x.conn, msg)
		f, err := catReadData(x.conn, x.br)
		if err != nil {
			t.Fatalf("echo after 101: %v", err)
		}
		if f != "echo "+id {
			t.Fatalf("echo = %q, want %q", f, "echo "+id)
		}
		got += " + echo"
	}
	return got
}

// checkUpstream checks what the backend saw of connection id.
func (e *catEnv) checkUpstream(t *testing.T, c catCase, id string) string {
	if c.upstream == catNoUpstream {
		if up := e.backend.peek(id); up != nil {
			end := up.waitEnd()
			t.Errorf("the backend was dialled for a refused request (its leg ended %v); want no upstream connection", end)
			return fmt.Sprintf("upstream dialled, then %v", end)
		}
		return "no upstream dial"
	}
	up := e.backend.peek(id)
	if up == nil {
		t.Errorf("the backend never saw connection %s, want its leg closed with %d", id, c.upstream)
		return "no upstream"
	}
	end := up.waitEnd()
	if end.code != c.upstream {
		t.Errorf("upstream leg ended %v, want close %d", end, c.upstream)
		return fmt.Sprintf("upstream %v", end)
	}
	return fmt.Sprintf("upstream %d", end.code)
}

// settleGoroutines waits for the goroutine count to come back to the
// baseline taken before the first case.
func (e *catEnv) settleGoroutines(t *testing.T, when string) {
	t.Helper()
	const slack = 5
	deadline := time.Now().Add(10 * time.Second)
	n := runtime.NumGoroutine()
	for n > e.baseline+slack && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		n = runtime.NumGoroutine()
	}
	t.Logf("goroutines: %d before the first case, %d %s", e.baseline, n, when)
	if n > e.baseline+slack {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		t.Errorf("goroutines = %d %s, want at most %d (baseline %d + %d)\n%s", n, when, e.baseline+slack, e.baseline, slack, buf)
	}
}

// --- the backend -------------------------------------------------------------

// catBackend is a gorilla echo server that records, by the id in the
// query, every upgrade request it got and how the connection ended.
type catBackend struct {
	t    testing.TB
	srv  *http.Server
	url  string
	done chan struct{} // Serve returned

	mu    sync.Mutex
	conns map[string]*catUpstream // by id; guarded by mu
	live  map[net.Conn]struct{}   // hijacked sockets; guarded by mu
	wg    sync.WaitGroup          // one per handler
}

// catUpstream is what the backend saw of one connection.
type catUpstream struct {
	ended chan catEnd // buffered 1
}

// catEnd is how a backend connection ended: the close code it received, or
// 1006 with the error when there was no close frame.
type catEnd struct {
	code int
	text string
	err  error
}

func (e catEnd) String() string {
	if e.err != nil {
		return fmt.Sprintf("%d (%v)", e.code, e.err)
	}
	return fmt.Sprintf("close %d %q", e.code, e.text)
}

func (u *catUpstream) waitEnd() catEnd {
	select {
	case e := <-u.ended:
		u.ended <- e
		return e
	case <-time.After(catWait):
		return catEnd{code: 0, err: errors.New("still open after " + catWait.String())}
	}
}

func catStartBackend(t *testing.T) *catBackend {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &catBackend{t: t, url: "ws://" + ln.Addr().String(), done: make(chan struct{}),
		conns: map[string]*catUpstream{}, live: map[net.Conn]struct{}{}}
	b.srv = &http.Server{Handler: b, ReadHeaderTimeout: catWait}
	go func() {
		defer close(b.done)
		b.srv.Serve(ln)
	}()
	t.Cleanup(b.close)
	return b
}

func (b *catBackend) close() {
	b.srv.Close()
	<-b.done
	b.mu.Lock()
	for c := range b.live {
		c.Close()
	}
	b.mu.Unlock()
	if !waitGroupWithin(&b.wg, catWait) {
		b.t.Errorf("catalogue backend handlers did not end")
	}
}

// peek returns what the backend saw of id, or nil if it never got a
// request for it.
func (b *catBackend) peek(id string) *catUpstream {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.conns[id]
}

func (b *catBackend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.wg.Add(1)
	defer b.wg.Done()
	// Recorded before the upgrade, so it precedes any answer sluice gives.
	up := &catUpstream{ended: make(chan catEnd, 1)}
	if id := r.URL.Query().Get("id"); id != "" {
		b.mu.Lock()
		b.conns[id] = up
		b.mu.Unlock()
	}
	u := gorilla.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}
	c, err := u.Upgrade(w, r, nil)
	if err != nil {
		up.ended <- catEnd{err: fmt.Errorf("upgrade: %w", err)}
		return
	}
	nc := c.UnderlyingConn()
	b.mu.Lock()
	b.live[nc] = struct{}{}
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		delete(b.live, nc)
		b.mu.Unlock()
		c.Close()
	}()
	for {
		typ, msg, err := c.ReadMessage()
		if err != nil {
			var ce *gorilla.CloseError
			if errors.As(err, &ce) {
				up.ended <- catEnd{code: ce.Code, text: ce.Text}
			} else {
				up.ended <- catEnd{code: gorilla.CloseAbnormalClosure, err: err}
			}
			return
		}
		if err := c.WriteMessage(typ, msg); err != nil {
			up.ended <- catEnd{code: gorilla.CloseAbnormalClosure, err: err}
			return
		}
	}
}

// --- the neighbour -----------------------------------------------------------

// catNeighbour is a healthy gorilla session through the same sluice that
// echoes a message every 20 ms for the whole catalogue.
type catNeighbour struct {
	conn    *gorilla.Conn
	count   atomic.Int64 // echoes completed
	slowest atomic.Int64 // the longest echo, in nanoseconds
	stop    chan struct{}
	done    chan struct{}

	mu  sync.Mutex
	err error // the first failure; guarded by mu
}

func catStartNeighbour(t *testing.T, base string, b *catBackend) *catNeighbour {
	d := gorilla.Dialer{HandshakeTimeout: catWait}
	c, _, err := d.Dial(base+"/echo?id=neighbour", nil)
	if err != nil {
		t.Fatalf("neighbour dial: %v", err)
	}
	n := &catNeighbour{conn: c, stop: make(chan struct{}), done: make(chan struct{})}
	go n.echoLoop()
	t.Cleanup(func() {
		close(n.stop)
		<-n.done
		c.WriteControl(gorilla.CloseMessage, gorilla.FormatCloseMessage(1000, "neighbour done"), time.Now().Add(catWait))
		c.SetReadDeadline(time.Now().Add(catWait))
		for {
			if _, _, err := c.ReadMessage(); err != nil {
				break
			}
		}
		c.Close()
		if err := n.failed(); err != nil {
			t.Errorf("neighbour: %v", err)
		}
		if up := b.peek("neighbour"); up == nil {
			t.Errorf("the backend never saw the neighbour")
		} else if end := up.waitEnd(); end.code != 1000 {
			t.Errorf("neighbour's upstream leg ended %v, want close 1000", end)
		}
	})
	return n
}

// echoLoop is the neighbour's goroutine.
func (n *catNeighbour) echoLoop() {
	defer close(n.done)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for i := 0; ; i++ {
		select {
		case <-n.stop:
			return
		case <-tick.C:
		}
		msg := []byte("neighbour " + strconv.Itoa(i))
		began := time.Now()
		n.conn.SetWriteDeadline(began.Add(catWait))
		if err := n.conn.WriteMessage(gorilla.TextMessage, msg); err != nil {
			n.fail(fmt.Errorf("write %d: %w", i, err))
			return
		}
		n.conn.SetReadDeadline(began.Add(catWait))
		_, got, err := n.conn.ReadMessage()
		if err != nil {
			n.fail(fmt.Errorf("read %d: %w", i, err))
			return
		}
		if !bytes.Equal(got, msg) {
			n.fail(fmt.Errorf("echo %d = %q, want %q", i, got, msg))
			return
		}
		if d := int64(time.Since(began)); d > n.slowest.Load() {
			n.slowest.Store(d)
		}
		n.count.Add(1)
	}
}

func (n *catNeighbour) fail(err error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.err == nil {
		n.err = err
	}
}

func (n *catNeighbour) failed() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.err
}

// progress returns the echo count, failing the test if the neighbour
// failed.
func (n *catNeighbour) progress(t *testing.T) int64 {
	t.Helper()
	if err := n.failed(); err != nil {
		t.Fatalf("neighbour disturbed: %v", err)
	}
	return n.count.Load()
}

// madeProgress waits for the neighbour to complete a few more echoes than
// it had at before.
func (n *catNeighbour) madeProgress(t *testing.T, before int64) {
	t.Helper()
	deadline := time.Now().Add(catWait)
	for n.progress(t) < before+3 {
		if time.Now().After(deadline) {
			t.Fatalf("neighbour stalled: %d echoes in %v (had %d)", n.count.Load()-before, catWait, before)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// --- panics ------------------------------------------------------------------

// catPanicWatch collects the standard logger's output (where net/http
// reports a handler's recovered panic: "http: panic serving ...") and
// sluice's warnings, and fails a case that left a panic in either. A
// panic in one of sluice's own goroutines kills the test binary outright.
type catPanicWatch struct {
	mu   sync.Mutex
	buf  bytes.Buffer // guarded by mu
	seen int          // bytes of buf already checked; guarded by mu
}

func catWatchPanics(t *testing.T) *catPanicWatch {
	w := &catPanicWatch{}
	prev, flags := log.Writer(), log.Flags()
	log.SetOutput(w)
	t.Cleanup(func() {
		log.SetOutput(prev)
		log.SetFlags(flags)
	})
	return w
}

func (w *catPanicWatch) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(p)
}

// check fails t if a panic was logged since the last check.
func (w *catPanicWatch) check(t *testing.T) {
	t.Helper()
	w.mu.Lock()
	fresh := w.buf.Bytes()[w.seen:]
	w.seen = w.buf.Len()
	w.mu.Unlock()
	if bytes.Contains(bytes.ToLower(fresh), []byte("panic")) {
		t.Errorf("panic logged during the case:\n%s", fresh)
	}
}

// --- raw HTTP ----------------------------------------------------------------

// catRaw renders a request from its request line and header lines.
func catRaw(requestLine string, headers ...string) []byte {
	var b bytes.Buffer
	b.WriteString(requestLine + "\r\n")
	for _, h := range headers {
		b.WriteString(h + "\r\n")
	}
	b.WriteString("\r\n")
	return b.Bytes()
}

// catUpgradeHeaders are the header lines of a valid upgrade, less those
// named in omit (an empty host leaves an empty Host field).
func catUpgradeHeaders(host string, omit []string) []string {
	all := []string{
		"Host: " + host,
		"Upgrade: websocket",
		"Connection: Upgrade",
		"Sec-WebSocket-Key: " + wstest.NewKey(),
		"Sec-WebSocket-Version: 13",
	}
	out := all[:0]
next:
	for _, h := range all {
		for _, o := range omit {
			if strings.HasPrefix(h, o+":") {
				continue next
			}
		}
		out = append(out, h)
	}
	return out
}

// catUpgrade is a valid upgrade request for /echo?id=id, less the headers
// named in omit, plus extra header lines.
func catUpgrade(host, id string, omit []string, extra ...string) []byte {
	return catRaw("GET /echo?id="+id+" HTTP/1.1", append(catUpgradeHeaders(host, omit), extra...)...)
}

// catConn is one raw exchange: the socket, its reader, and the response
// if one came.
type catConn struct {
	conn    net.Conn
	br      *bufio.Reader
	resp    *http.Response
	err     error
	written chan struct{}
}

func (x *catConn) close() {
	x.conn.Close()
	<-x.written
}

// catExchange writes req (from a goroutine: sluice may answer, and close,
// before it has read everything) and reads the response.
func catExchange(t *testing.T, addr string, req []byte) *catConn {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, catWait)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	conn.SetDeadline(time.Now().Add(catWait))
	x := &catConn{conn: conn, br: bufio.NewReader(conn), written: make(chan struct{})}
	go func() {
		defer close(x.written)
		conn.Write(req)
	}()
	x.resp, x.err = http.ReadResponse(x.br, nil)
	return x
}

// catIsClosed: err is the peer closing the connection.
func catIsClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, net.ErrClosed)
}

// catExpectEOF reads until sluice closes the connection; any byte is an
// error.
func catExpectEOF(conn net.Conn, r io.Reader) error {
	conn.SetReadDeadline(time.Now().Add(catWait))
	var buf [256]byte
	for {
		n, err := r.Read(buf[:])
		if n > 0 {
			return fmt.Errorf("%d unexpected bytes: %q", n, buf[:n])
		}
		if err != nil {
			if catIsClosed(err) {
				return nil
			}
			return fmt.Errorf("connection not closed: %w", err)
		}
	}
}

// --- WebSocket bytes -------------------------------------------------------------

// catFrame renders a frame, masked with a fixed key when masked.
func catFrame(fin bool, rsv byte, op ws.OpCode, payload []byte, masked bool) []byte {
	h := ws.Header{Fin: fin, Rsv: rsv, OpCode: op, Length: int64(len(payload)), Masked: masked}
	p := append([]byte(nil), payload...)
	if masked {
		h.Mask = [4]byte{0x37, 0xfa, 0x21, 0x3d}
		ws.Cipher(p, h.Mask, 0)
	}
	var b bytes.Buffer
	if err := ws.WriteHeader(&b, h); err != nil {
		panic(err)
	}
	return append(b.Bytes(), p...)
}

// catHeader renders a masked frame header with no payload after it.
func catHeader(h ws.Header) []byte {
	h.Masked = true
	h.Mask = [4]byte{1, 2, 3, 4}
	var b bytes.Buffer
	if err := ws.WriteHeader(&b, h); err != nil {
		panic(err)
	}
	return b.Bytes()
}

func catClosePayload(code ws.StatusCode, reason string) []byte {
	return append([]byte{byte(code >> 8), byte(code)}, reason...)
}

func catWriteAll(t *testing.T, conn net.Conn, b []byte) {
	t.Helper()
	conn.SetWriteDeadline(time.Now().Add(catWait))
	if _, err := conn.Write(b); err != nil {
		t.Fatalf("write: %v", err)
	}
}

// catDialGobwas handshakes with sluice the proper way, with a gobwas
// ws.Dialer on a raw net.Conn; the cleanup closes the socket.
func catDialGobwas(t *testing.T, addr, id string) (net.Conn, *bufio.Reader) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, catWait)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(catWait))
	u, _ := url.Parse("ws://" + addr + "/echo?id=" + id)
	br, _, err := ws.Dialer{}.Upgrade(conn, u)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	conn.SetDeadline(time.Time{})
	if br == nil {
		br = bufio.NewReader(conn)
	}
	return conn, br
}

// catNextFrame reads one frame that sluice sent: unmasked, and short
// (sluice sends nothing long in the catalogue).
func catNextFrame(conn net.Conn, r io.Reader) (ws.Header, []byte, error) {
	conn.SetReadDeadline(time.Now().Add(catWait))
	h, err := ws.ReadHeader(r)
	if err != nil {
		return h, nil, err
	}
	if h.Masked {
		return h, nil, errors.New("frame from sluice is masked")
	}
	if h.Length > 1<<20 {
		return h, nil, fmt.Errorf("frame of %d bytes", h.Length)
	}
	p := make([]byte, h.Length)
	if _, err := io.ReadFull(r, p); err != nil {
		return h, nil, err
	}
	return h, p, nil
}

// catReadClose reads frames until a close frame and returns its code.
func catReadClose(conn net.Conn, r io.Reader) (ws.StatusCode, string, error) {
	for {
		h, p, err := catNextFrame(conn, r)
		if err != nil {
			return 0, "", err
		}
		if h.OpCode != ws.OpClose {
			continue
		}
		if len(p) < 2 {
			return ws.StatusNoStatusRcvd, "", nil
		}
		return ws.StatusCode(uint16(p[0])<<8 | uint16(p[1])), string(p[2:]), nil
	}
}

// catReadData reads the next data message, which must be one frame.
func catReadData(conn net.Conn, r io.Reader) (string, error) {
	for {
		h, p, err := catNextFrame(conn, r)
		if err != nil {
			return "", err
		}
		switch h.OpCode {
		case ws.OpPing, ws.OpPong:
			continue
		case ws.OpClose:
			return "", fmt.Errorf("close frame %q instead of data", p)
		}
		if !h.Fin {
			return "", errors.New("fragmented echo")
		}
		return string(p), nil
	}
}

// --- scripted cases ----------------------------------------------------------

// catPipelined: a valid upgrade and n masked text frames in one write. The
// frames sit behind the request in net/http's read buffer (and past it for
// large n) and must all reach the backend and come back.
func catPipelined(n int) func(t *testing.T, e *catEnv, id string) string {
	return func(t *testing.T, e *catEnv, id string) string {
		req := catUpgrade(e.addr, id, nil)
		var want []string
		for i := range n {
			msg := fmt.Sprintf("pipelined %d %s", i, strings.Repeat("p", 500))
			want = append(want, msg)
			req = append(req, catFrame(true, 0, ws.OpText, []byte(msg), true)...)
		}
		x := catExchange(t, e.addr, req)
		defer x.close()
		if x.resp == nil {
			t.Fatalf("no answer: %v", x.err)
		}
		if x.resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("status = %s, want 101", x.resp.Status)
		}
		for i, w := range want {
			got, err := catReadData(x.conn, x.br)
			if err != nil {
				t.Fatalf("echo %d of %d: %v", i, n, err)
			}
			if got != w {
				t.Fatalf("echo %d = %.20q, want %.20q", i, got, w)
			}
		}
		// Then vanish: the backend must get 1001.
		return fmt.Sprintf("101 + %d echoes", n)
	}
}

// catSlowloris drips a valid upgrade request a byte every 100 ms: sluice
// (net/http's ReadHeaderTimeout) must give up at the handshake timeout.
// Go's net/http answers a request cut short by the timeout with a bare 400
// once some bytes came (and closes silently when none did); either way the
// connection is closed and nothing is dialled.
func catSlowloris(t *testing.T, e *catEnv, id string) string {
	conn, err := net.DialTimeout("tcp", e.addr, catWait)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	began := time.Now()
	type answer struct {
		resp *http.Response
		err  error
		took time.Duration
	}
	answered := make(chan answer, 1)
	br := bufio.NewReader(conn)
	go func() {
		conn.SetReadDeadline(time.Now().Add(catWait))
		resp, err := http.ReadResponse(br, nil)
		if err == nil {
			io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
		}
		answered <- answer{resp, err, time.Since(began)}
	}()
	req := catUpgrade(e.addr, id, nil)
	sent := 0
	var a answer
drip:
	for _, c := range req {
		select {
		case a = <-answered:
			break drip
		case <-time.After(100 * time.Millisecond):
		}
		conn.SetWriteDeadline(time.Now().Add(catWait))
		if _, err := conn.Write([]byte{c}); err != nil {
			a = <-answered
			break
		}
		sent++
	}
	if sent == len(req) {
		t.Fatalf("the whole request (%d bytes over %v) went through", sent, time.Since(began))
	}
	got := "closed, no answer"
	switch {
	case a.resp != nil && a.resp.StatusCode == http.StatusBadRequest:
		got = "400"
		if err := catExpectEOF(conn, br); err != nil {
			t.Errorf("after the 400: %v", err)
		}
	case a.resp != nil:
		t.Errorf("status = %s, want 400 or no answer", a.resp.Status)
		got = a.resp.Status
	case !catIsClosed(a.err):
		t.Fatalf("after %d bytes: %v, want the connection closed", sent, a.err)
	}
	if limit := 2 * catHandshakeTimeout; a.took > limit+catSlack() {
		t.Errorf("answered after %v, want within %v", a.took, limit)
	}
	return fmt.Sprintf("%s after %d bytes, %v", got, sent, a.took.Round(time.Millisecond))
}

// catSlack is the allowance for a busy 2-core machine under the race
// detector on top of a timing bound.
func catSlack() time.Duration { return 500 * time.Millisecond }

// catIdleSockets opens many sockets that never send a byte: sluice must
// close each within twice the handshake timeout, the neighbour must keep
// going meanwhile, and nothing may be left of them afterwards.
func catIdleSockets(t *testing.T, e *catEnv, _ string) string {
	n := *catSockets
	if n == 0 {
		n, _ = strconv.Atoi(os.Getenv("CATALOGUE_SOCKETS"))
	}
	if n <= 0 {
		n = 1000
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < uint64(2*n+1000) {
		t.Fatalf("%d idle sockets need %d file descriptors (both ends in one process); the limit is %d: raise ulimit -n", n, 2*n+1000, lim.Cur)
	}

	type result struct {
		took time.Duration
		err  error
	}
	results := make(chan result, n)
	conns := make([]net.Conn, n)
	var dialErr atomic.Value
	var wg sync.WaitGroup
	idx := make(chan int)
	began := time.Now()
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range idx {
				c, err := net.DialTimeout("tcp", e.addr, catWait)
				if err != nil {
					dialErr.CompareAndSwap(nil, err)
					results <- result{err: err}
					continue
				}
				conns[i] = c
				opened := time.Now()
				wg.Add(1)
				go func() {
					defer wg.Done()
					c.SetReadDeadline(opened.Add(catWait))
					var b [64]byte
					k, err := c.Read(b[:])
					if k > 0 {
						err = fmt.Errorf("answer %q", b[:k])
					}
					results <- result{took: time.Since(opened), err: err}
				}()
			}
		}()
	}
	for i := range n {
		idx <- i
	}
	close(idx)
	opened := time.Since(began)
	// The neighbour keeps going while the sockets sit there.
	mid := e.neighbour.progress(t)
	wg.Wait()
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	close(results)
	if err, _ := dialErr.Load().(error); err != nil {
		t.Errorf("dialling %d sockets: %v", n, err)
	}
	var took []time.Duration
	bad := 0
	for r := range results {
		if r.err != nil && !catIsClosed(r.err) {
			if bad < 3 {
				t.Errorf("idle socket: %v after %v, want closed by sluice", r.err, r.took)
			}
			bad++
			continue
		}
		took = append(took, r.took)
	}
	sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
	if len(took) == 0 {
		t.Fatalf("no socket was closed by sluice (%d failed)", bad)
	}
	p50, max := took[len(took)/2], took[len(took)-1]
	if bad > 0 {
		t.Errorf("%d of %d idle sockets were not closed by sluice", bad, n)
	}
	if limit := 2 * catHandshakeTimeout; max > limit+catSlack() {
		t.Errorf("slowest idle socket closed after %v, want within %v", max, limit)
	}
	e.neighbour.madeProgress(t, mid)
	e.settleGoroutines(t, "after the idle sockets")
	return fmt.Sprintf("%d sockets (opened in %v): closed after p50 %v, max %v",
		n, opened.Round(time.Millisecond), p50.Round(time.Millisecond), max.Round(time.Millisecond))
}
