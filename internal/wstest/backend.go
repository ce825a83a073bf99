package wstest

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
)

// RawBackend is a gobwas/ws server on 127.0.0.1 that hands each upgraded
// connection to a handler on a goroutine of its own. The test's cleanup
// closes the listener and every connection and waits for every handler.
type RawBackend struct {
	Addr    string       // host:port
	URL     string       // ws://host:port/
	Accepts atomic.Int64 // connections accepted

	ln net.Listener
	wg sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]struct{} // open connections; guarded by mu
}

// RawConn is one upgraded backend connection. Read reads the bytes that
// arrived with the upgrade request first.
type RawConn struct {
	net.Conn
	BR     *bufio.Reader
	Header http.Header // the upgrade request's headers
}

func (c *RawConn) Read(p []byte) (int, error) { return c.BR.Read(p) }

// RawOptions adjusts a RawBackend.
type RawOptions struct {
	// BeforeUpgrade, if set, sees the request's headers before the 101
	// goes out, so that what it records is there once a client is in.
	BeforeUpgrade func(http.Header)
}

// ServeRaw starts a RawBackend whose connections handle serves; the
// connection is closed when handle returns. Listening sockets have no TCP
// keepalive: its setsockopt calls would weigh on handshake benchmarks.
func ServeRaw(t testing.TB, o RawOptions, handle func(*RawConn)) *RawBackend {
	t.Helper()
	lc := net.ListenConfig{KeepAlive: -1}
	ln, err := lc.Listen(t.Context(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("backend listen: %v", err)
	}
	b := &RawBackend{Addr: ln.Addr().String(), URL: "ws://" + ln.Addr().String() + "/", ln: ln, conns: map[net.Conn]struct{}{}}
	b.wg.Add(1)
	go b.rawAcceptor(o, handle)
	t.Cleanup(b.close)
	return b
}

func (b *RawBackend) rawAcceptor(o RawOptions, handle func(*RawConn)) {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.Accepts.Add(1)
		b.mu.Lock()
		b.conns[c] = struct{}{}
		b.mu.Unlock()
		b.wg.Add(1)
		go b.rawHandler(c, o, handle)
	}
}

// rawHandler upgrades c and runs handle on it.
func (b *RawBackend) rawHandler(c net.Conn, o RawOptions, handle func(*RawConn)) {
	defer b.wg.Done()
	defer func() {
		c.Close()
		b.mu.Lock()
		delete(b.conns, c)
		b.mu.Unlock()
	}()
	rc := &RawConn{Conn: c, BR: bufio.NewReader(c), Header: http.Header{}}
	u := ws.Upgrader{
		OnHeader: func(k, v []byte) error {
			rc.Header.Add(string(k), string(v))
			return nil
		},
		OnBeforeUpgrade: func() (ws.HandshakeHeader, error) {
			if o.BeforeUpgrade != nil {
				o.BeforeUpgrade(rc.Header)
			}
			return nil, nil
		},
	}
	c.SetDeadline(time.Now().Add(IOTimeout))
	if _, err := u.Upgrade(struct {
		io.Reader
		io.Writer
	}{rc.BR, c}); err != nil {
		return
	}
	c.SetDeadline(time.Time{})
	handle(rc)
}

// CloseListener stops accepting connections: a dial to Addr is refused
// from then on. Open connections go on.
func (b *RawBackend) CloseListener() { b.ln.Close() }

func (b *RawBackend) close() {
	b.ln.Close()
	b.mu.Lock()
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// Echo echoes every message of c, with its opcode, until the connection
// ends, and returns the error that ended it (a wsutil.ClosedError for a
// close frame).
func Echo(c *RawConn) error {
	for {
		msg, op, err := wsutil.ReadClientData(c)
		if err != nil {
			return err
		}
		if err := wsutil.WriteServerMessage(c, op, msg); err != nil {
			return err
		}
	}
}
