package integration

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gobwas/ws"
	gorilla "github.com/gorilla/websocket"

	"github.com/sluice-proxy/sluice/internal/wstest"
)

// backend is the WebSocket server behind sluice. Its behaviour is chosen by
// the request path; the query's id names the connection so that the test
// can read what the backend saw on it (upstreamConn).
//
//	/echo                          echo every message with its type
//	/close?code=&reason=[&after=msg]  send a close at once (or after the first message)
//	/reject?status=                answer status with a body and headers, no upgrade
//	/subproto                      accept with Subprotocols b, c
//	/cookie                        101 with two Set-Cookie headers
//	/headers                       send the request headers as a JSON text message, then echo
//	/ping                          send ping "bp-1" at once, then echo
//	/compress                      EnableCompression, then echo
//	/hello[?coalesce=1]            send "hello" right after the 101 (coalesced: the 101 and two
//	                               messages in one write, by a raw server), then echo
//	/drop                          close the TCP connection after the first message
//	/frames                        raw gobwas server: record and echo each frame as it came
//	/hold                          signal arrived, wait for release, then accept and echo
//	/conformance[?limit=n]         plain streaming gorilla echo for the conformance suite
//	                               (NextReader/NextWriter, default ping handler, SetReadLimit(n))
//
// gorilla connections record pings and pongs they receive and how they ended.
type backend struct {
	t   testing.TB
	srv *httptest.Server
	url string // ws://host:port

	mu    sync.Mutex
	conns map[string]*upstreamConn // by id; guarded by mu
	live  map[net.Conn]struct{}    // hijacked sockets; guarded by mu
	wg    sync.WaitGroup           // one per handler
}

// upstreamConn is what the backend saw on one connection.
type upstreamConn struct {
	id    string
	ready chan struct{} // closed once the fields below are set

	header      http.Header // the upgrade request's headers
	subprotocol string      // negotiated

	ended  chan closeSeen    // how the connection ended; buffered 1
	pings  chan string       // ping payloads received
	pongs  chan string       // pong payloads received
	frames chan wstest.Frame // /frames: every frame received, in order

	arrived chan struct{} // /hold: closed when the upgrade request arrives
	release chan struct{} // /hold: the test closes it to let the upgrade go on
}

// closeSeen is how a backend connection ended: the close frame it received
// (code 1006 when it got none, with err).
type closeSeen struct {
	code int
	text string
	err  error
}

func (c closeSeen) String() string {
	if c.err != nil {
		return fmt.Sprintf("%d %q (%v)", c.code, c.text, c.err)
	}
	return fmt.Sprintf("%d %q", c.code, c.text)
}

func newBackend(t testing.TB) *backend {
	t.Helper()
	b := &backend{t: t, conns: map[string]*upstreamConn{}, live: map[net.Conn]struct{}{}}
	b.srv = httptest.NewServer(b)
	b.url = "ws" + strings.TrimPrefix(b.srv.URL, "http")
	t.Cleanup(b.close)
	return b
}

// close stops the backend and ends every handler, hijacked ones included
// (httptest.Server.Close does not wait for those).
func (b *backend) close() {
	b.srv.Close()
	b.mu.Lock()
	for c := range b.live {
		c.Close()
	}
	b.mu.Unlock()
	if !waitGroupWithin(&b.wg, wstest.IOTimeout) {
		b.t.Errorf("backend handlers did not end")
	}
}

// conn returns the record of connection id, made on first use by either
// the handler or the test.
// An empty id gets a record of its own that nobody can look up.
func (b *backend) conn(id string) *upstreamConn {
	b.mu.Lock()
	defer b.mu.Unlock()
	c, ok := b.conns[id]
	if !ok {
		c = &upstreamConn{
			id:     id,
			ready:  make(chan struct{}),
			ended:  make(chan closeSeen, 1),
			pings:  make(chan string, 64),
			pongs:  make(chan string, 64),
			frames: make(chan wstest.Frame, 1024),

			arrived: make(chan struct{}),
			release: make(chan struct{}),
		}
		if id != "" {
			b.conns[id] = c
		}
	}
	return c
}

// waitConn returns the record of id once the backend has accepted it.
func (b *backend) waitConn(t testing.TB, id string) *upstreamConn {
	t.Helper()
	c := b.conn(id)
	select {
	case <-c.ready:
	case <-time.After(wstest.IOTimeout):
		t.Fatalf("backend never accepted connection %s", id)
	}
	return c
}

// ended waits for how connection id ended.
func (b *backend) ended(t testing.TB, id string) closeSeen {
	t.Helper()
	return recv(t, b.conn(id).ended, "backend connection "+id+" to end")
}

func (b *backend) track(c net.Conn) {
	b.mu.Lock()
	b.live[c] = struct{}{}
	b.mu.Unlock()
}

func (b *backend) untrack(c net.Conn) {
	b.mu.Lock()
	delete(b.live, c)
	b.mu.Unlock()
}

func (b *backend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.wg.Add(1)
	defer b.wg.Done()
	q := r.URL.Query()
	uc := b.conn(q.Get("id"))
	switch r.URL.Path {
	case "/reject":
		status, _ := strconv.Atoi(q.Get("status"))
		h := w.Header()
		h.Set("WWW-Authenticate", `Bearer realm="sluice-test"`)
		h.Set("Retry-After", "7")
		h.Add("Set-Cookie", "rejected=1; Path=/")
		h.Add("Set-Cookie", "tries=2; HttpOnly")
		h.Set("Content-Type", "text/plain; charset=utf-8")
		h.Set("X-Backend", "reject")
		w.WriteHeader(status)
		io.WriteString(w, "go away")
		return
	case "/frames":
		b.serveFrames(w, r, uc)
		return
	case "/conformance":
		b.serveConformanceEcho(w, r, uc)
		return
	case "/hold":
		close(uc.arrived)
		select {
		case <-uc.release:
		case <-time.After(wstest.IOTimeout):
			http.Error(w, "never released", http.StatusServiceUnavailable)
			return
		}
	case "/hello":
		if q.Get("coalesce") == "1" {
			b.serveCoalescedHello(w, r, uc)
			return
		}
	}
	b.serveGorilla(w, r, uc)
}

func (b *backend) serveGorilla(w http.ResponseWriter, r *http.Request, uc *upstreamConn) {
	q := r.URL.Query()
	up := gorilla.Upgrader{
		CheckOrigin: func(*http.Request) bool { return true },
	}
	var respHeader http.Header
	switch r.URL.Path {
	case "/subproto":
		up.Subprotocols = []string{"b", "c"}
	case "/cookie":
		respHeader = http.Header{"Set-Cookie": {"session=s3cr3t; Path=/; HttpOnly", "theme=dark"}}
	case "/compress":
		up.EnableCompression = true
	}
	c, err := up.Upgrade(w, r, respHeader)
	if err != nil {
		return
	}
	b.track(c.UnderlyingConn())
	defer b.untrack(c.UnderlyingConn())
	defer c.Close()

	uc.header = r.Header.Clone()
	uc.subprotocol = c.Subprotocol()
	close(uc.ready)

	c.SetPingHandler(func(p string) error {
		nonBlockingSend(uc.pings, p)
		err := c.WriteControl(gorilla.PongMessage, []byte(p), time.Now().Add(wstest.IOTimeout))
		if errors.Is(err, gorilla.ErrCloseSent) {
			return nil
		}
		return err
	})
	c.SetPongHandler(func(p string) error {
		nonBlockingSend(uc.pongs, p)
		return nil
	})

	closeCode, _ := strconv.Atoi(q.Get("code"))
	sendClose := func() {
		c.WriteControl(gorilla.CloseMessage, gorilla.FormatCloseMessage(closeCode, q.Get("reason")), time.Now().Add(wstest.IOTimeout))
	}
	switch r.URL.Path {
	case "/close":
		if q.Get("after") != "msg" {
			sendClose()
		}
	case "/headers":
		js, _ := json.Marshal(r.Header)
		if c.WriteMessage(gorilla.TextMessage, js) != nil {
			return
		}
	case "/ping":
		c.WriteControl(gorilla.PingMessage, []byte("bp-1"), time.Now().Add(wstest.IOTimeout))
	case "/hello":
		if c.WriteMessage(gorilla.TextMessage, []byte("hello")) != nil {
			return
		}
	}
	for first := true; ; first = false {
		typ, msg, err := c.ReadMessage()
		if err != nil {
			nonBlockingSend(uc.ended, closeSeenOf(err))
			return
		}
		switch r.URL.Path {
		case "/drop":
			// Vanish without a close frame.
			c.UnderlyingConn().Close()
			nonBlockingSend(uc.ended, closeSeen{code: gorilla.CloseAbnormalClosure, err: errors.New("dropped by the backend")})
			return
		case "/close":
			if first && q.Get("after") == "msg" {
				sendClose()
			}
			continue
		}
		if err := c.WriteMessage(typ, msg); err != nil {
			nonBlockingSend(uc.ended, closeSeenOf(err))
			return
		}
	}
}

func closeSeenOf(err error) closeSeen {
	var ce *gorilla.CloseError
	if errors.As(err, &ce) {
		return closeSeen{code: ce.Code, text: ce.Text}
	}
	return closeSeen{code: gorilla.CloseAbnormalClosure, err: err}
}

// serveFrames is a raw gobwas server: it records every frame as it arrives
// and writes it back unmasked with the same FIN, RSV and opcode, so both
// directions can be checked for preserved frame boundaries. A close is
// answered with the same code and ends the connection.
func (b *backend) serveFrames(w http.ResponseWriter, r *http.Request, uc *upstreamConn) {
	conn, rw, _, err := ws.UpgradeHTTP(r, w)
	if err != nil {
		return
	}
	uc.header = r.Header.Clone()
	close(uc.ready)
	b.rawLoop(conn, rw.Reader, uc, true)
}

// serveCoalescedHello answers the upgrade by hand so that the 101 and two
// messages leave in one write: sluice's dialer reads them together, and
// must not lose the frames it read ahead.
func (b *backend) serveCoalescedHello(w http.ResponseWriter, r *http.Request, uc *upstreamConn) {
	conn, rw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return
	}
	var out bytes.Buffer
	fmt.Fprintf(&out, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
		wstest.AcceptKey(r.Header.Get("Sec-Websocket-Key")))
	out.Write(wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpText, Payload: []byte("hello 1")}))
	out.Write(wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpText, Payload: []byte("hello 2")}))
	if _, err := conn.Write(out.Bytes()); err != nil {
		conn.Close()
		return
	}
	uc.header = r.Header.Clone()
	close(uc.ready)
	b.rawLoop(conn, rw.Reader, uc, false)
}

// rawLoop reads frames from a raw server connection until a close or an
// error. With record set, each frame is recorded; data, ping and pong frames
// are echoed as they came.
func (b *backend) rawLoop(conn net.Conn, br *bufio.Reader, uc *upstreamConn, record bool) {
	b.track(conn)
	defer b.untrack(conn)
	defer conn.Close()
	for {
		f, err := wstest.ReadFrame(br)
		if err != nil {
			nonBlockingSend(uc.ended, closeSeen{code: gorilla.CloseAbnormalClosure, err: err})
			return
		}
		if record {
			nonBlockingSend(uc.frames, f)
		}
		masked := f.Masked
		f.Masked = false
		switch f.Op {
		case ws.OpClose:
			seen := closeSeen{code: gorilla.CloseNoStatusReceived}
			if len(f.Payload) >= 2 {
				code, reason := ws.ParseCloseFrameData(f.Payload)
				seen = closeSeen{code: int(code), text: reason}
			}
			if !masked {
				seen.err = errors.New("close frame from sluice was not masked")
			}
			reply := wstest.Frame{Fin: true, Op: ws.OpClose}
			if len(f.Payload) >= 2 {
				reply.Payload = f.Payload[:2]
			}
			conn.SetWriteDeadline(time.Now().Add(wstest.IOTimeout))
			conn.Write(wstest.Encode(reply))
			nonBlockingSend(uc.ended, seen)
			return
		case ws.OpPing:
			nonBlockingSend(uc.pings, string(f.Payload))
		case ws.OpPong:
			nonBlockingSend(uc.pongs, string(f.Payload))
		}
		if !record && f.Op != ws.OpText && f.Op != ws.OpBinary && f.Op != ws.OpContinuation {
			continue
		}
		conn.SetWriteDeadline(time.Now().Add(wstest.IOTimeout))
		if _, err := conn.Write(wstest.Encode(f)); err != nil {
			nonBlockingSend(uc.ended, closeSeen{code: gorilla.CloseAbnormalClosure, err: err})
			return
		}
	}
}
