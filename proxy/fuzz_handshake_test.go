package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/internal/wstest"
)

// fuzzAnswerWait bounds one exchange: sluice must answer or close by then.
const fuzzAnswerWait = 2 * time.Second

// fuzzCheckEvery is how often (in inputs) a proper upgrade checks that
// sluice still serves.
const fuzzCheckEvery = 100

// FuzzServeHandshake writes arbitrary bytes as a client's request to a real
// sluice Server over loopback TCP, then half-closes. Sluice must not panic
// (the Server recovers a handshake's panic and logs it), must answer with a
// well-formed HTTP response (a 101 being a proper upgrade) or close without
// a word, within fuzzAnswerWait, and must go on serving proper upgrades.
func FuzzServeHandshake(f *testing.F) {
	// The committed corpus in testdata/fuzz/FuzzServeHandshake holds the
	// interesting requests; one here keeps `go test` meaningful without it.
	f.Add([]byte("GET /x HTTP/1.1\r\nHost: sluice\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"))

	// One sluice and one backend per process (each fuzz worker is one),
	// started on the first input and stopped when the target ends.
	var (
		once  sync.Once
		fx    *fuzzHandshakeFixture
		count atomic.Uint64
	)
	f.Cleanup(func() {
		if fx != nil {
			fx.stop()
		}
	})
	f.Fuzz(func(t *testing.T, raw []byte) {
		once.Do(func() { fx = startFuzzHandshakeFixture(t) })
		if fx == nil {
			t.Fatal("the fixture did not start")
		}
		n := count.Add(1)
		if err := fx.exchange(raw); err != nil {
			t.Fatalf("request %q: %v", fuzzTrim(raw), err)
		}
		if err := fx.panics.take(); err != nil {
			t.Fatalf("request %q: %v", fuzzTrim(raw), err)
		}
		if n%fuzzCheckEvery == 1 {
			if err := fx.properUpgrade(n); err != nil {
				t.Fatalf("after %d requests, the last %q: sluice stopped serving: %v", n, fuzzTrim(raw), err)
			}
		}
	})
}

// fuzzHandshakeFixture is a sluice Server in front of a gobwas echo
// backend, both on loopback.
type fuzzHandshakeFixture struct {
	srv       *Server
	addr      string
	backend   net.Listener
	panics    *fuzzPanicLog
	served    chan struct{}
	upstreams sync.WaitGroup
}

func startFuzzHandshakeFixture(t *testing.T) *fuzzHandshakeFixture {
	fx := &fuzzHandshakeFixture{panics: &fuzzPanicLog{}, served: make(chan struct{})}
	var err error
	fx.backend, err = net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fx.upstreams.Add(1)
	go fx.backendAcceptor()
	u, _ := url.Parse("ws://" + fx.backend.Addr().String())
	fx.srv, err = New(Options{
		Upstream: u,
		// Errors only: a recovered panic is logged at error level.
		Logger:           zerolog.New(fx.panics).Level(zerolog.ErrorLevel),
		HandshakeTimeout: time.Second,
		DialTimeout:      time.Second,
		CloseTimeout:     time.Second,
		MaxFrameBytes:    64 << 10,
		MaxMessageBytes:  128 << 10,
	})
	if err != nil {
		fx.backend.Close()
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fx.backend.Close()
		t.Fatal(err)
	}
	fx.addr = ln.Addr().String()
	go func() {
		defer close(fx.served)
		fx.srv.Serve(ln)
	}()
	return fx
}

func (fx *fuzzHandshakeFixture) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	fx.srv.Shutdown(ctx)
	<-fx.served
	fx.backend.Close()
	fx.upstreams.Wait()
}

// backendAcceptor accepts every upstream connection sluice makes.
func (fx *fuzzHandshakeFixture) backendAcceptor() {
	defer fx.upstreams.Done()
	for {
		c, err := fx.backend.Accept()
		if err != nil {
			return
		}
		fx.upstreams.Add(1)
		go fx.upstreamEcho(c)
	}
}

// upstreamEcho upgrades whatever sluice sends and echoes messages until
// the connection ends.
func (fx *fuzzHandshakeFixture) upstreamEcho(c net.Conn) {
	defer fx.upstreams.Done()
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := ws.Upgrade(c); err != nil {
		return
	}
	wstest.Echo(&wstest.RawConn{Conn: c, BR: bufio.NewReader(c)})
}

// exchange writes raw, half-closes, and checks sluice's answer.
func (fx *fuzzHandshakeFixture) exchange(raw []byte) error {
	conn, err := net.DialTimeout("tcp", fx.addr, fuzzAnswerWait)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(fuzzAnswerWait))
	// Written from a goroutine: sluice may answer, and stop reading,
	// before it has all of raw.
	written := make(chan struct{})
	go func() {
		defer close(written)
		if _, err := conn.Write(raw); err == nil {
			conn.(*net.TCPConn).CloseWrite()
		}
	}()
	defer func() {
		conn.Close()
		<-written
	}()
	counted := &fuzzCountingReader{r: conn}
	br := bufio.NewReader(counted)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		var ne net.Error
		switch {
		case counted.n == 0 && (errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)):
			return nil // closed without a word: the request was not whole
		case errors.As(err, &ne) && ne.Timeout():
			return fmt.Errorf("no answer and the connection still open after %v", fuzzAnswerWait)
		}
		rest, _ := io.ReadAll(io.LimitReader(br, 256))
		return fmt.Errorf("malformed answer: %v (then %q)", err, rest)
	}
	defer resp.Body.Close()
	if resp.StatusCode < 100 || resp.StatusCode > 599 {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		if !bytes.EqualFold([]byte(resp.Header.Get("Upgrade")), []byte("websocket")) || resp.Header.Get("Sec-Websocket-Accept") == "" {
			return fmt.Errorf("101 without a WebSocket handshake: %v", resp.Header)
		}
		return nil
	}
	if _, err := io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20)); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return fmt.Errorf("%d: body not ended within %v", resp.StatusCode, fuzzAnswerWait)
		}
	}
	return nil
}

// properUpgrade checks that sluice still serves: a gobwas client upgrades
// and gets an echo.
func (fx *fuzzHandshakeFixture) properUpgrade(n uint64) error {
	ctx, cancel := context.WithTimeout(context.Background(), fuzzAnswerWait)
	defer cancel()
	conn, br, _, err := ws.Dialer{}.Dial(ctx, "ws://"+fx.addr+"/check")
	if err != nil {
		return fmt.Errorf("upgrade: %w", err)
	}
	defer conn.Close()
	if br != nil {
		ws.PutReader(br)
	}
	conn.SetDeadline(time.Now().Add(fuzzAnswerWait))
	msg := []byte(fmt.Sprintf("still serving %d", n))
	if err := wsutil.WriteClientText(conn, msg); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got, err := wsutil.ReadServerText(conn)
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	wsutil.WriteClientMessage(conn, ws.OpClose, ws.NewCloseFrameBody(ws.StatusNormalClosure, ""))
	return nil
}

// fuzzPanicLog is the Server's log: a handshake's recovered panic is
// written there as "panic in client handshake".
type fuzzPanicLog struct {
	mu  sync.Mutex
	buf bytes.Buffer // guarded by mu
}

func (l *fuzzPanicLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if bytes.Contains(p, []byte("panic")) {
		l.buf.Write(p)
	}
	return len(p), nil
}

// take returns the panics logged since the last call.
func (l *fuzzPanicLog) take() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.buf.Len() == 0 {
		return nil
	}
	err := fmt.Errorf("sluice panicked: %s", l.buf.Bytes())
	l.buf.Reset()
	return err
}

// fuzzCountingReader counts the bytes sluice sent, to tell a silent close
// from a cut answer (http.ReadResponse reports both as unexpected EOF).
type fuzzCountingReader struct {
	r io.Reader
	n int
}

func (c *fuzzCountingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

func fuzzTrim(b []byte) []byte {
	if len(b) > 200 {
		return b[:200]
	}
	return b
}
