package integration

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	gorilla "github.com/gorilla/websocket"
)

// bpHeaderLen is the part of every broadcast message that carries its
// sequence number (bytes 0-7) and the time the backend began writing it
// (bytes 8-15, Unix nanoseconds), both big-endian. The rest of the payload
// is a pattern derived from the sequence number, so that a torn or mixed
// message cannot pass for a whole one.
const bpHeaderLen = 16

// bpMessage builds broadcast message seq of size bytes (at least
// bpHeaderLen).
func bpMessage(seq uint64, size int, sent time.Time) []byte {
	b := make([]byte, max(size, bpHeaderLen))
	binary.BigEndian.PutUint64(b, seq)
	binary.BigEndian.PutUint64(b[8:], uint64(sent.UnixNano()))
	bpFill(b[bpHeaderLen:], seq)
	return b
}

// bpFill writes message seq's pattern, which repeats every 256 bytes, to
// p. It copies rather than loops, which keeps 4 MiB messages cheap under
// the race detector.
func bpFill(p []byte, seq uint64) {
	x := byte(seq * 131)
	n := copy(p, bpPeriod(x))
	for n < len(p) {
		n += copy(p[n:], p[:n])
	}
}

// bpPeriod is one period of the pattern that starts with x.
func bpPeriod(x byte) []byte {
	b := make([]byte, 256)
	for i := range b {
		b[i] = x + byte(i*7)
	}
	return b
}

// bpParse checks that msg is a whole broadcast message of want bytes and
// returns its sequence number.
func bpParse(msg []byte, want int) (uint64, error) {
	want = max(want, bpHeaderLen)
	if len(msg) < bpHeaderLen {
		return 0, fmt.Errorf("message of %d bytes, shorter than its %d-byte header", len(msg), bpHeaderLen)
	}
	seq := binary.BigEndian.Uint64(msg)
	if len(msg) != want {
		return seq, fmt.Errorf("message %d has %d bytes, want %d", seq, len(msg), want)
	}
	period := bpPeriod(byte(seq * 131))
	body := msg[bpHeaderLen:]
	for off := 0; off < len(body); off += len(period) {
		chunk := body[off:min(off+len(period), len(body))]
		if !bytes.Equal(chunk, period[:len(chunk)]) {
			for i, c := range chunk {
				if c != period[i] {
					return seq, fmt.Errorf("message %d: byte %d is %#x, want %#x (torn or mixed message)", seq, bpHeaderLen+off+i, c, period[i])
				}
			}
		}
	}
	return seq, nil
}

// bpBackendConfig shapes what a bpBackend broadcasts.
type bpBackendConfig struct {
	// Size is the payload size of every message; a connection's ?size=
	// query parameter overrides it for that connection.
	Size int
	// Interval is the time between two publications while publishing;
	// Burst is how many messages each publishes (default 1).
	Interval time.Duration
	Burst    int
	// FragmentEvery makes every message whose sequence number it divides go
	// out in several frames (gorilla NextWriter, several writes); 0: never.
	FragmentEvery uint64
	// SendBuffer is SO_SNDBUF for the backend's sockets, so that a leg
	// whose reader stops blocks the backend's writes soon; 0 keeps the
	// kernel's autotuned buffer.
	SendBuffer int
}

// bpBackend is an independent gorilla/websocket server that broadcasts
// numbered messages to every connection. Each connection has its own
// writer goroutine, which writes without a deadline: when the peer stops
// reading and the socket buffers fill, that writer simply blocks, and the
// backend shows it (bpBackendConn.BlockedFor) while the other connections
// go on. Messages are made on demand from their sequence number, so a
// blocked connection costs the backend no memory.
//
// A connection is named by the ?id= of its request; sluice passes the
// client's query on, so a test finds the upstream leg of each of its
// clients with Conn. ?size= sets the connection's message size, and
// ?big= makes the first message it is sent that large and fragmented.
type bpBackend struct {
	t   testing.TB
	cfg bpBackendConfig
	srv *httptest.Server
	url string // ws://host:port

	mu    sync.Mutex
	seq   uint64                    // last message published; guarded by mu
	wake  chan struct{}             // closed and replaced by each publication; guarded by mu
	conns map[string]*bpBackendConn // by id; guarded by mu

	pubStop chan struct{} // closed by StopPublishing
	pubDone chan struct{} // closed when the publisher has ended

	done      chan struct{} // closed by close: every writer ends
	closeOnce sync.Once
	wg        sync.WaitGroup // handlers, writers and the publisher
}

// bpBackendConn is what the backend knows about one connection.
type bpBackendConn struct {
	id    string
	size  int
	big   int    // size of message first, always fragmented; 0: as the others
	first uint64 // the first message it is sent
	ws    *gorilla.Conn

	written      atomic.Uint64 // messages whose write has returned
	lastSeq      atomic.Uint64 // the last of them
	writingSince atomic.Int64  // Unix ns the write in progress began; 0 when none
	closeCode    atomic.Int64  // close code received; -1 closed without one; 0 open

	readDone   chan struct{} // the reader has ended (close frame or error)
	writerDone chan struct{}
}

// Written is the number of messages the backend has fully written to c.
func (c *bpBackendConn) Written() uint64 { return c.written.Load() }

// LastSeq is the sequence number of the last message fully written to c.
func (c *bpBackendConn) LastSeq() uint64 { return c.lastSeq.Load() }

// BlockedFor is how long the write in progress on c has lasted; 0 when no
// write is in progress.
func (c *bpBackendConn) BlockedFor() time.Duration {
	since := c.writingSince.Load()
	if since == 0 {
		return 0
	}
	return time.Since(time.Unix(0, since))
}

// CloseCode is the close code the backend received on c: 0 while c is
// open, -1 if it ended without a close frame.
func (c *bpBackendConn) CloseCode() int { return int(c.closeCode.Load()) }

// bpSendBufferListener sets SO_SNDBUF on every accepted socket. Setting it
// also turns off the kernel's send-buffer autotuning for the socket.
type bpSendBufferListener struct {
	net.Listener
	size int
}

func (l bpSendBufferListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		if tc, ok := c.(*net.TCPConn); ok {
			if serr := tc.SetWriteBuffer(l.size); serr != nil {
				c.Close()
				return nil, serr
			}
		}
	}
	return c, err
}

// bpNewBackend starts a broadcasting backend on 127.0.0.1. Nothing is
// published until StartPublishing or Publish. A cleanup closes every
// connection and waits for all of the backend's goroutines.
func bpNewBackend(t testing.TB, cfg bpBackendConfig) *bpBackend {
	t.Helper()
	if cfg.Burst <= 0 {
		cfg.Burst = 1
	}
	b := &bpBackend{
		t:     t,
		cfg:   cfg,
		wake:  make(chan struct{}),
		conns: make(map[string]*bpBackendConn),
		done:  make(chan struct{}),
	}
	b.srv = httptest.NewUnstartedServer(http.HandlerFunc(b.serve))
	if cfg.SendBuffer > 0 {
		b.srv.Listener = bpSendBufferListener{b.srv.Listener, cfg.SendBuffer}
	}
	b.srv.Start()
	b.url = "ws" + strings.TrimPrefix(b.srv.URL, "http")
	t.Cleanup(b.close)
	return b
}

// close stops publishing, closes every connection and waits for every
// goroutine the backend started.
func (b *bpBackend) close() {
	b.closeOnce.Do(func() {
		b.srv.Close() // no new handlers; hijacked connections are ours
		close(b.done)
		b.mu.Lock()
		for _, c := range b.conns {
			c.ws.Close()
		}
		b.mu.Unlock()
		b.wg.Wait()
	})
}

// Conn returns the connection named id, or nil.
func (b *bpBackend) Conn(id string) *bpBackendConn {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.conns[id]
}

// Conns is the number of connections the backend has accepted.
func (b *bpBackend) Conns() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.conns)
}

// Latest is the sequence number of the last message published.
func (b *bpBackend) Latest() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.seq
}

// Publish makes n more messages and wakes every connection's writer.
func (b *bpBackend) Publish(n int) {
	b.mu.Lock()
	b.seq += uint64(n)
	close(b.wake)
	b.wake = make(chan struct{})
	b.mu.Unlock()
}

// StartPublishing publishes Burst messages every Interval until
// StopPublishing.
func (b *bpBackend) StartPublishing() {
	if b.cfg.Interval <= 0 {
		b.t.Fatal("bpBackend: StartPublishing needs an Interval")
	}
	b.pubStop, b.pubDone = make(chan struct{}), make(chan struct{})
	b.wg.Add(1)
	go b.publisher(b.pubStop, b.pubDone)
}

// StopPublishing stops the publisher and returns the last sequence number
// published; nothing is published after it returns.
func (b *bpBackend) StopPublishing() uint64 {
	if b.pubStop != nil {
		close(b.pubStop)
		<-b.pubDone
		b.pubStop = nil
	}
	return b.Latest()
}

// publisher is the goroutine behind StartPublishing.
func (b *bpBackend) publisher(stop <-chan struct{}, done chan<- struct{}) {
	defer b.wg.Done()
	defer close(done)
	tick := time.NewTicker(b.cfg.Interval)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-b.done:
			return
		case <-tick.C:
			b.Publish(b.cfg.Burst)
		}
	}
}

// serve upgrades one connection, starts its writer and reads until the
// peer closes, recording the close code it got.
func (b *bpBackend) serve(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	id := q.Get("id")
	size, big := b.cfg.Size, 0
	for name, v := range map[string]*int{"size": &size, "big": &big} {
		if s := q.Get(name); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil {
				http.Error(w, "bad "+name, http.StatusBadRequest)
				return
			}
			*v = n
		}
	}
	up := gorilla.Upgrader{
		// A small write buffer: fragmented messages leave in many frames.
		WriteBufferSize: 512,
		CheckOrigin:     func(*http.Request) bool { return true },
	}
	ws, err := up.Upgrade(w, r, nil)
	if err != nil {
		return // Upgrade has answered
	}
	c := &bpBackendConn{id: id, size: size, big: big, ws: ws, readDone: make(chan struct{}), writerDone: make(chan struct{})}
	b.mu.Lock()
	select {
	case <-b.done:
		b.mu.Unlock()
		ws.Close()
		return
	default:
	}
	if _, dup := b.conns[id]; dup || id == "" {
		b.mu.Unlock()
		ws.Close()
		b.t.Errorf("bpBackend: connection id %q missing or used twice", id)
		return
	}
	c.first = b.seq + 1
	b.conns[id] = c
	b.wg.Add(2) // this handler, from here on, and the writer
	b.mu.Unlock()
	defer b.wg.Done()
	go b.broadcastWriter(c)

	for {
		if _, _, err := ws.ReadMessage(); err != nil {
			var ce *gorilla.CloseError
			if errors.As(err, &ce) {
				c.closeCode.Store(int64(ce.Code))
			} else {
				c.closeCode.Store(-1)
			}
			break
		}
	}
	close(c.readDone)
	ws.Close() // ends a write blocked on a peer that has gone
	<-c.writerDone
}

// broadcastWriter is the only goroutine that writes data to c. It writes
// every message from c.first on, in order, with no write deadline.
func (b *bpBackend) broadcastWriter(c *bpBackendConn) {
	defer b.wg.Done()
	defer close(c.writerDone)
	next := c.first
	for {
		b.mu.Lock()
		latest, wake := b.seq, b.wake
		b.mu.Unlock()
		for ; next <= latest; next++ {
			select {
			case <-c.readDone:
				return
			default:
			}
			if err := b.write(c, next); err != nil {
				return
			}
		}
		select {
		case <-wake:
		case <-c.readDone:
			return
		case <-b.done:
			return
		}
	}
}

// bpMaxChunk bounds the frames of a fragmented message, below sluice's
// largest inline frame, so that every frame is queued, not streamed.
const bpMaxChunk = 64 << 10

// write sends message seq to c, fragmented when FragmentEvery says so.
func (b *bpBackend) write(c *bpBackendConn, seq uint64) error {
	now := time.Now()
	size := c.size
	f := b.cfg.FragmentEvery
	fragment := f > 0 && seq%f == 0
	if seq == c.first && c.big > 0 {
		size, fragment = c.big, true
	}
	msg := bpMessage(seq, size, now)
	c.writingSince.Store(now.UnixNano())
	if err := b.send(c, msg, fragment); err != nil {
		return err
	}
	// Unblocked before counted: a test that sees the count sees the end
	// of the write too.
	c.writingSince.Store(0)
	c.lastSeq.Store(seq)
	c.written.Add(1)
	return nil
}

// send writes msg to c as one frame or, with fragment, several.
func (b *bpBackend) send(c *bpBackendConn, msg []byte, fragment bool) error {
	if fragment {
		w, err := c.ws.NextWriter(gorilla.BinaryMessage)
		if err != nil {
			return err
		}
		// At least four writes through the 512-byte buffer: gorilla
		// flushes a frame whenever its buffer fills, and at once for a
		// write past twice its size, so the message leaves in several
		// frames.
		chunk := min(max(1, (len(msg)+3)/4), bpMaxChunk)
		for p := msg; len(p) > 0; {
			n := min(chunk, len(p))
			if _, err := w.Write(p[:n]); err != nil {
				return err
			}
			p = p[n:]
		}
		return w.Close()
	}
	return c.ws.WriteMessage(gorilla.BinaryMessage, msg)
}
