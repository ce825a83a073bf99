package frame

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gobwas/ws"
)

// testTimeout bounds every blocking read so a failing test cannot hang.
const testTimeout = 10 * time.Second

// transport makes a connected pair: bytes written to w arrive at r.
type transport struct {
	name string
	pair func(t testing.TB) (w, r net.Conn)
	raw  bool // r offers a syscall.RawConn, so the Reader can go bufferless
}

var transports = []transport{
	{name: "tcp", pair: tcpPair, raw: true},
	{name: "pipe", pair: pipePair},
}

func tcpPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		c   net.Conn
		err error
	}
	accepted := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		accepted <- result{c, err}
	}()
	w, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	res := <-accepted
	if res.err != nil {
		w.Close()
		t.Fatal(res.err)
	}
	t.Cleanup(func() { w.Close(); res.c.Close() })
	return w, res.c
}

func pipePair(t testing.TB) (net.Conn, net.Conn) {
	w, r := net.Pipe()
	t.Cleanup(func() { w.Close(); r.Close() })
	return w, r
}

// newTestReader returns a Reader of conn with a read deadline set.
func newTestReader(t testing.TB, conn net.Conn, pending []byte) *Reader {
	t.Helper()
	if err := conn.SetReadDeadline(time.Now().Add(testTimeout)); err != nil {
		t.Fatal(err)
	}
	r := NewReader(conn, pending)
	t.Cleanup(r.Release)
	return r
}

// writeChunks writes each chunk with its own Write in the background, waits
// pause between chunks, and closes w at the end when closeAfter is set. The
// returned channel yields the first error (or nil) once done; the test waits
// for it at cleanup so no writer outlives the test.
func writeChunks(t testing.TB, w net.Conn, pause time.Duration, closeAfter bool, chunks ...[]byte) <-chan error {
	done := make(chan error, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var err error
		for _, c := range chunks {
			if _, err = w.Write(c); err != nil {
				break
			}
			if pause > 0 {
				time.Sleep(pause)
			}
		}
		if closeAfter {
			w.Close()
		}
		done <- err
	}()
	t.Cleanup(func() { w.Close(); wg.Wait() })
	return done
}

func waitWriter(t testing.TB, done <-chan error) {
	t.Helper()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("writer: %v", err)
		}
	case <-time.After(testTimeout):
		t.Fatal("writer did not finish")
	}
}

// testFrame is one frame of a test stream, encoded by gobwas/ws so the
// Reader is checked against an independent encoder.
type testFrame struct {
	h       ws.Header
	payload []byte // unmasked
}

func (f testFrame) header() []byte {
	var b bytes.Buffer
	if err := ws.WriteHeader(&b, f.h); err != nil {
		panic(err)
	}
	return b.Bytes()
}

func (f testFrame) wire() []byte {
	p := bytes.Clone(f.payload)
	if f.h.Masked {
		ws.Cipher(p, f.h.Mask, 0)
	}
	return append(f.header(), p...)
}

func makeFrame(op ws.OpCode, fin, masked bool, n int, seed uint64) testFrame {
	rng := rand.New(rand.NewPCG(seed, uint64(n)))
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(rng.Uint32())
	}
	h := ws.Header{Fin: fin, OpCode: op, Masked: masked, Length: int64(n)}
	if masked {
		h.Mask = ws.NewMask()
	}
	return testFrame{h: h, payload: p}
}

func wireOf(frames ...testFrame) []byte {
	var b []byte
	for _, f := range frames {
		b = append(b, f.wire()...)
	}
	return b
}

// payloadMethod consumes a payload of n bytes and returns it unmasked (nil
// for Discard).
type payloadMethod struct {
	name string
	read func(r *Reader, h ws.Header) ([]byte, error)
}

var payloadMethods = []payloadMethod{
	{"ReadFull", func(r *Reader, h ws.Header) ([]byte, error) {
		p := make([]byte, h.Length)
		err := r.ReadFull(p)
		return p, err
	}},
	{"CopyN", func(r *Reader, h ws.Header) ([]byte, error) {
		var b bytes.Buffer
		n, err := r.CopyN(&b, h.Length)
		if err == nil && n != h.Length {
			return nil, io.ErrShortWrite
		}
		return b.Bytes(), err
	}},
	{"Discard", func(r *Reader, h ws.Header) ([]byte, error) {
		return nil, r.Discard(h.Length)
	}},
	{"CopyN to a plain Writer", func(r *Reader, h ws.Header) ([]byte, error) {
		// No ReadFrom: CopyN takes its io.Copy path.
		var b bytes.Buffer
		n, err := r.CopyN(struct{ io.Writer }{&b}, h.Length)
		if err == nil && n != h.Length {
			return nil, io.ErrShortWrite
		}
		return b.Bytes(), err
	}},
}

// expectFrame reads one frame and checks its header, raw header bytes and
// payload against f.
func expectFrame(t testing.TB, r *Reader, f testFrame, m payloadMethod) {
	t.Helper()
	h, raw, err := r.ReadHeader()
	if err != nil {
		t.Fatalf("ReadHeader: %v", err)
	}
	if h != f.h {
		t.Fatalf("header %+v, want %+v", h, f.h)
	}
	if !bytes.Equal(raw, f.header()) {
		t.Fatalf("raw header % x, want % x", raw, f.header())
	}
	p, err := m.read(r, h)
	if err != nil {
		t.Fatalf("%s of %d bytes: %v", m.name, h.Length, err)
	}
	if p == nil {
		return
	}
	if h.Masked {
		ws.Cipher(p, h.Mask, 0)
	}
	if !bytes.Equal(p, f.payload) {
		t.Fatalf("%s: payload of %d bytes differs", m.name, len(p))
	}
}

func expectEOF(t testing.TB, r *Reader) {
	t.Helper()
	if _, _, err := r.ReadHeader(); err != io.EOF {
		t.Fatalf("ReadHeader at end: %v, want io.EOF", err)
	}
}

func TestReaderHeadersByteByByte(t *testing.T) {
	frames := []testFrame{
		makeFrame(ws.OpText, true, true, 0, 1),
		makeFrame(ws.OpBinary, true, false, 5, 2),
		makeFrame(ws.OpPing, true, true, 125, 3),
		makeFrame(ws.OpBinary, false, true, 126, 4),       // 16-bit length
		makeFrame(ws.OpContinuation, true, false, 300, 5), // 16-bit length
		makeFrame(ws.OpBinary, true, true, 65535, 6),
		makeFrame(ws.OpBinary, true, true, 65536, 7), // 64-bit length
		makeFrame(ws.OpClose, true, false, 2, 8),
	}
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			w, c := tr.pair(t)
			var chunks [][]byte
			for _, f := range frames {
				for _, b := range f.header() {
					chunks = append(chunks, []byte{b})
				}
				chunks = append(chunks, f.wire()[len(f.header()):])
			}
			// On TCP the pause lets each byte go out on its own; net.Pipe
			// hands over each Write separately anyway.
			pause := time.Duration(0)
			if tr.raw {
				pause = 100 * time.Microsecond
			}
			r := newTestReader(t, c, nil)
			done := writeChunks(t, w, pause, true, chunks...)
			for i, f := range frames {
				expectFrame(t, r, f, payloadMethods[i%len(payloadMethods)])
			}
			expectEOF(t, r)
			waitWriter(t, done)
		})
	}
}

// manySmallFrames is a stream of small masked frames long enough to wrap
// the Reader's buffer many times, with headers falling across its end.
func manySmallFrames(count int) []testFrame {
	frames := make([]testFrame, count)
	for i := range frames {
		op, n := ws.OpBinary, i%23
		switch {
		case i%101 == 50:
			n = 126 + i%300 // 16-bit lengths from time to time
		case i%7 == 3:
			op = ws.OpPing
		}
		frames[i] = makeFrame(op, true, true, n, uint64(i))
	}
	return frames
}

func TestReaderManySmallFramesOneWrite(t *testing.T) {
	frames := manySmallFrames(5000)
	stream := wireOf(frames...)
	for _, tr := range transports {
		for _, m := range payloadMethods {
			t.Run(tr.name+"/"+m.name, func(t *testing.T) {
				w, c := tr.pair(t)
				r := newTestReader(t, c, nil)
				done := writeChunks(t, w, 0, true, stream)
				ch := &Checker{FromClient: true}
				for _, f := range frames {
					expectFrame(t, r, f, m)
					if err := ch.Check(f.h); err != nil {
						t.Fatal(err)
					}
				}
				expectEOF(t, r)
				waitWriter(t, done)
			})
		}
	}
}

// TestReaderOddChunks delivers a stream in chunks of every size from 1 to 40
// bytes, so that headers fall across chunk ends and the end of the buffer in
// every possible way.
func TestReaderOddChunks(t *testing.T) {
	frames := manySmallFrames(1500)
	stream := wireOf(frames...)
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			w, c := tr.pair(t)
			var chunks [][]byte
			for i, rest := 0, stream; len(rest) > 0; i++ {
				n := min(1+i%40, len(rest))
				chunks = append(chunks, rest[:n])
				rest = rest[n:]
			}
			r := newTestReader(t, c, nil)
			done := writeChunks(t, w, 0, true, chunks...)
			for i, f := range frames {
				expectFrame(t, r, f, payloadMethods[i%len(payloadMethods)])
			}
			expectEOF(t, r)
			waitWriter(t, done)
		})
	}
}

func TestReaderPayloadMethods(t *testing.T) {
	sizes := []int{0, 1, 100, readBufferSize - 1, readBufferSize, readBufferSize + 1, 100000}
	for _, tr := range transports {
		for _, m := range payloadMethods {
			t.Run(tr.name+"/"+m.name, func(t *testing.T) {
				var frames []testFrame
				for i, n := range sizes {
					frames = append(frames, makeFrame(ws.OpBinary, true, i%2 == 0, n, uint64(n)))
				}
				// A last small frame proves the stream stayed in sync.
				frames = append(frames, makeFrame(ws.OpText, true, false, 3, 99))
				w, c := tr.pair(t)
				// Split the stream so a payload is partly buffered and partly
				// still on the wire.
				stream := wireOf(frames...)
				r := newTestReader(t, c, nil)
				done := writeChunks(t, w, 0, true, stream[:4000], stream[4000:20000], stream[20000:])
				for _, f := range frames {
					expectFrame(t, r, f, m)
				}
				expectEOF(t, r)
				waitWriter(t, done)
			})
		}
	}
}

func TestReaderLengthMSB(t *testing.T) {
	streams := map[string][]byte{
		"unmasked": {0x82, 0x7f, 0x80, 0, 0, 0, 0, 0, 0, 1},
		"masked":   {0x82, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4},
		"after a frame": append(makeFrame(ws.OpText, true, false, 3, 1).wire(),
			0x80, 0x7f, 0x80, 0, 0, 0, 0, 0, 0, 0),
	}
	for _, tr := range transports {
		for name, stream := range streams {
			t.Run(tr.name+"/"+name, func(t *testing.T) {
				w, c := tr.pair(t)
				r := newTestReader(t, c, nil)
				done := writeChunks(t, w, 0, false, stream)
				var err error
				for i := 0; i < 3 && err == nil; i++ {
					var h ws.Header
					h, _, err = r.ReadHeader()
					if err == nil {
						err = r.Discard(h.Length)
					}
				}
				if !errors.Is(err, ErrLengthMSB) {
					t.Fatalf("got %v, want %v", err, ErrLengthMSB)
				}
				var fe *Error
				if !errors.As(err, &fe) || fe.Code != ws.StatusProtocolError {
					t.Fatalf("got %v, want a *Error with code 1002", err)
				}
				waitWriter(t, done)
			})
		}
	}
}

func TestReaderUnexpectedEOF(t *testing.T) {
	full := makeFrame(ws.OpBinary, true, true, 70000, 1).wire()
	cases := []struct {
		name   string
		stream []byte
		method payloadMethod // used when the header is whole
	}{
		{"one byte", []byte{0x82}, payloadMethods[0]},
		{"no extended length", []byte{0x82, 0x7e}, payloadMethods[0]},
		{"half extended length", []byte{0x82, 0x7e, 0x01}, payloadMethods[0]},
		{"half 64-bit length", []byte{0x82, 0x7f, 0, 0, 0, 0}, payloadMethods[0]},
		{"no mask", []byte{0x82, 0x85}, payloadMethods[0]},
		{"half mask", []byte{0x82, 0x85, 1, 2}, payloadMethods[0]},
		{"half mask after frame", append(makeFrame(ws.OpText, true, true, 4, 2).wire(), 0x82, 0xff, 0, 0, 0, 0, 0, 0, 0, 1, 9), payloadMethods[0]},
		{"payload ReadFull", full[:len(full)-1], payloadMethods[0]},
		{"payload CopyN", full[:len(full)-1], payloadMethods[1]},
		{"payload Discard", full[:len(full)-1], payloadMethods[2]},
		{"small payload ReadFull", makeFrame(ws.OpText, true, false, 10, 3).wire()[:7], payloadMethods[0]},
		{"small payload CopyN", makeFrame(ws.OpText, true, false, 10, 3).wire()[:7], payloadMethods[1]},
		{"small payload Discard", makeFrame(ws.OpText, true, false, 10, 3).wire()[:7], payloadMethods[2]},
		{"payload CopyN to a plain Writer", full[:len(full)-1], payloadMethods[3]},
		{"empty payload", makeFrame(ws.OpText, true, false, 10, 3).wire()[:2], payloadMethods[0]},
	}
	for _, tr := range transports {
		for _, tc := range cases {
			t.Run(tr.name+"/"+tc.name, func(t *testing.T) {
				w, c := tr.pair(t)
				r := newTestReader(t, c, nil)
				done := writeChunks(t, w, 0, true, tc.stream)
				var err error
				for i := 0; i < 3 && err == nil; i++ {
					var h ws.Header
					h, _, err = r.ReadHeader()
					if err == nil {
						_, err = tc.method.read(r, h)
					}
				}
				if err != io.ErrUnexpectedEOF {
					t.Fatalf("got %v, want io.ErrUnexpectedEOF", err)
				}
				waitWriter(t, done)
			})
		}
	}
}

func TestReaderCleanEOF(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name+"/empty", func(t *testing.T) {
			w, c := tr.pair(t)
			r := newTestReader(t, c, nil)
			done := writeChunks(t, w, 0, true)
			expectEOF(t, r)
			expectEOF(t, r) // and it stays at EOF
			waitWriter(t, done)
		})
		t.Run(tr.name+"/after frames", func(t *testing.T) {
			frames := []testFrame{makeFrame(ws.OpText, true, true, 10, 1), makeFrame(ws.OpBinary, true, true, 20000, 2)}
			w, c := tr.pair(t)
			r := newTestReader(t, c, nil)
			done := writeChunks(t, w, 0, true, wireOf(frames...))
			for _, f := range frames {
				expectFrame(t, r, f, payloadMethods[1])
			}
			expectEOF(t, r)
			waitWriter(t, done)
		})
	}
}

func TestReaderPending(t *testing.T) {
	frames := []testFrame{
		makeFrame(ws.OpText, true, false, 5, 1),
		makeFrame(ws.OpBinary, true, false, 300, 2),
		makeFrame(ws.OpPing, true, false, 4, 3),
	}
	stream := wireOf(frames...)
	// The handshake read the first frame and 3 bytes of the second header.
	cut := len(frames[0].wire()) + 3
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			w, c := tr.pair(t)
			pending := bytes.Clone(stream[:cut])
			r := newTestReader(t, c, pending)
			done := writeChunks(t, w, 0, true, stream[cut:])
			if r.Buffered() != cut {
				t.Fatalf("Buffered %d, want %d", r.Buffered(), cut)
			}
			clear(pending) // NewReader must have copied it
			for _, f := range frames {
				expectFrame(t, r, f, payloadMethods[0])
			}
			expectEOF(t, r)
			waitWriter(t, done)
		})
	}
	t.Run("only pending", func(t *testing.T) {
		w, c := pipePair(t)
		r := newTestReader(t, c, stream)
		w.Close()
		for _, f := range frames {
			expectFrame(t, r, f, payloadMethods[1])
		}
		expectEOF(t, r)
	})
	t.Run("pending fills a buffer", func(t *testing.T) {
		big := makeFrame(ws.OpBinary, true, false, readBufferSize-4, 4).wire()
		if len(big) != readBufferSize {
			t.Fatalf("frame of %d bytes", len(big))
		}
		w, c := pipePair(t)
		r := newTestReader(t, c, big)
		w.Close()
		h, _, err := r.ReadHeader()
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Discard(h.Length); err != nil {
			t.Fatal(err)
		}
		expectEOF(t, r)
	})
}

// TestReaderIdleHoldsNoBuffer checks that a Reader on a socket gives its
// buffer back when it has no unread bytes and must wait. Observing the
// Reader while another goroutine blocks in it would race, so the wait is
// cut short by a read deadline and the state checked afterwards.
func TestReaderIdleHoldsNoBuffer(t *testing.T) {
	deadlines := map[string]time.Duration{
		"deadline passed": -time.Second, // the wait ends before it starts
		"deadline soon":   20 * time.Millisecond,
	}
	for name, d := range deadlines {
		t.Run(name, func(t *testing.T) {
			w, c := tcpPair(t)
			f := makeFrame(ws.OpText, true, true, 50, 1)
			r := newTestReader(t, c, nil)
			done := writeChunks(t, w, 0, false, f.wire())
			expectFrame(t, r, f, payloadMethods[0])
			waitWriter(t, done)
			if r.Buffered() != 0 {
				t.Fatalf("%d bytes still buffered", r.Buffered())
			}

			c.SetReadDeadline(time.Now().Add(d))
			_, _, err := r.ReadHeader()
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("ReadHeader: %v, want a deadline error", err)
			}
			if r.buf != nil {
				t.Fatal("an idle Reader holds a buffer")
			}

			// The Reader is still usable once the deadline moves.
			c.SetReadDeadline(time.Now().Add(testTimeout))
			f2 := makeFrame(ws.OpBinary, true, true, 10, 2)
			done = writeChunks(t, w, 0, true, f2.wire())
			expectFrame(t, r, f2, payloadMethods[0])
			expectEOF(t, r)
			waitWriter(t, done)
			if r.buf != nil {
				t.Fatal("a Reader at EOF holds a buffer")
			}
		})
	}
	t.Run("after CopyN", func(t *testing.T) {
		w, c := tcpPair(t)
		f := makeFrame(ws.OpBinary, true, true, 200000, 1)
		r := newTestReader(t, c, nil)
		done := writeChunks(t, w, 0, false, f.wire())
		expectFrame(t, r, f, payloadMethods[1])
		waitWriter(t, done)
		if r.buf != nil {
			t.Fatal("Reader holds a buffer after copying a payload from the socket")
		}
	})
	t.Run("partial header keeps buffer", func(t *testing.T) {
		w, c := tcpPair(t)
		r := newTestReader(t, c, nil)
		waitWriter(t, writeChunks(t, w, 0, false, []byte{0x82, 0xfe, 0x01}))
		// The three bytes must be there before the short deadline starts,
		// or it could pass with none read.
		if err := waitReadable(c); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if _, _, err := r.ReadHeader(); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("ReadHeader: %v, want a deadline error", err)
		}
		if r.Buffered() != 3 || r.buf == nil {
			t.Fatalf("Buffered %d, buf %v: the partial header was lost", r.Buffered(), r.buf != nil)
		}
		c.SetReadDeadline(time.Now().Add(testTimeout))
		done := writeChunks(t, w, 0, true, append([]byte{0x00, 1, 2, 3, 4}, make([]byte, 0x100)...))
		h, _, err := r.ReadHeader()
		if err != nil || h.Length != 0x100 || !h.Masked || h.Mask != [4]byte{1, 2, 3, 4} {
			t.Fatalf("ReadHeader %+v, %v", h, err)
		}
		waitWriter(t, done)
	})
	t.Run("Release", func(t *testing.T) {
		_, c := pipePair(t)
		r := NewReader(c, []byte{1, 2, 3})
		if r.buf == nil {
			t.Fatal("pending bytes not buffered")
		}
		r.Release()
		if r.buf != nil || r.Buffered() != 0 {
			t.Fatal("Release kept the buffer")
		}
		r.Release() // twice is harmless
	})
}

func TestReaderDeadline(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name+"/header", func(t *testing.T) {
			_, c := tr.pair(t)
			r := newTestReader(t, c, nil)
			c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
			_, _, err := r.ReadHeader()
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("ReadHeader: %v, want a deadline error", err)
			}
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				t.Fatalf("%v is not a net.Error timeout", err)
			}
		})
		for _, m := range payloadMethods {
			t.Run(tr.name+"/"+m.name, func(t *testing.T) {
				w, c := tr.pair(t)
				f := makeFrame(ws.OpBinary, true, false, 50000, 1)
				r := newTestReader(t, c, nil)
				done := writeChunks(t, w, 0, false, f.wire()[:30000])
				h, _, err := r.ReadHeader()
				if err != nil {
					t.Fatal(err)
				}
				if tr.raw {
					waitWriter(t, done)
				} // else the pipe writer blocks until cleanup closes it
				c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
				if _, err := m.read(r, h); !errors.Is(err, os.ErrDeadlineExceeded) {
					t.Fatalf("%s: %v, want a deadline error", m.name, err)
				}
			})
		}
	}
}

// TestReaderCopyNTCP forwards a 4 MiB payload from one TCP connection to
// another, the path where the kernel splices.
func TestReaderCopyNTCP(t *testing.T) {
	const size = 4 << 20
	in, c := tcpPair(t)
	out, sink := tcpPair(t)
	f := makeFrame(ws.OpBinary, true, true, size, 42)
	last := makeFrame(ws.OpText, true, true, 7, 43)
	stream := wireOf(f, last)
	// The first chunk leaves part of the payload in the Reader's buffer.
	done := writeChunks(t, in, 0, true, stream[:1000], stream[1000:])

	received := make(chan []byte, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		sink.SetReadDeadline(time.Now().Add(testTimeout))
		b := make([]byte, size)
		n, _ := io.ReadFull(sink, b)
		received <- b[:n]
	}()
	t.Cleanup(wg.Wait)

	r := newTestReader(t, c, nil)
	h, _, err := r.ReadHeader()
	if err != nil || h != f.h {
		t.Fatalf("ReadHeader %+v, %v", h, err)
	}
	n, err := r.CopyN(out, h.Length)
	if err != nil || n != size {
		t.Fatalf("CopyN: %d, %v", n, err)
	}
	got := <-received
	ws.Cipher(got, h.Mask, 0)
	if !bytes.Equal(got, f.payload) {
		t.Fatalf("payload of %d bytes arrived corrupted (%d bytes)", size, len(got))
	}
	expectFrame(t, r, last, payloadMethods[0])
	expectEOF(t, r)
	waitWriter(t, done)
}

// TestReaderCopyNTCPTruncated cuts the stream inside a payload on the splice
// path: CopyN must report io.ErrUnexpectedEOF, not a short success.
func TestReaderCopyNTCPTruncated(t *testing.T) {
	const size = 1 << 20
	in, c := tcpPair(t)
	out, sink := tcpPair(t)
	f := makeFrame(ws.OpBinary, true, true, size, 7)
	wire := f.wire()
	r := newTestReader(t, c, nil)
	done := writeChunks(t, in, 0, true, wire[:len(wire)-1000])

	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // sinkDrainer: keeps the output socket from filling up
		defer wg.Done()
		sink.SetReadDeadline(time.Now().Add(testTimeout))
		io.Copy(io.Discard, sink)
	}()
	t.Cleanup(wg.Wait)
	t.Cleanup(func() { out.Close() })

	h, _, err := r.ReadHeader()
	if err != nil {
		t.Fatal(err)
	}
	n, err := r.CopyN(out, h.Length)
	if err != io.ErrUnexpectedEOF || n != size-1000 {
		t.Fatalf("CopyN: %d, %v; want %d, io.ErrUnexpectedEOF", n, err, size-1000)
	}
	waitWriter(t, done)
}

// TestReaderIdle checks the answer a caller uses to stop reading an idle
// socket: true only with nothing buffered and nothing on the socket, and
// never at the cost of a byte.
func TestReaderIdle(t *testing.T) {
	t.Run("socket", func(t *testing.T) {
		w, c := tcpPair(t)
		r := newTestReader(t, c, nil)
		if idle, err := r.Idle(); !idle || err != nil {
			t.Fatalf("Idle on an empty socket: %v, %v", idle, err)
		}
		if r.buf != nil {
			t.Fatal("an idle Reader holds a buffer")
		}
		// Half a frame: not idle, and the half is kept.
		f := makeFrame(ws.OpText, true, true, 50, 1)
		wire := f.wire()
		waitWriter(t, writeChunks(t, w, 0, false, wire[:4]))
		for {
			idle, err := r.Idle()
			if err != nil {
				t.Fatal(err)
			}
			if !idle {
				break
			}
			// The bytes are in flight on loopback: wait for readability
			// the way a caller would, then ask again.
			c.SetReadDeadline(time.Now().Add(testTimeout))
			if err := waitReadable(c); err != nil {
				t.Fatal(err)
			}
		}
		if r.Buffered() == 0 {
			t.Fatal("Idle read bytes but buffers none")
		}
		if idle, _ := r.Idle(); idle {
			t.Fatal("Idle with bytes buffered")
		}
		done := writeChunks(t, w, 0, true, wire[4:])
		expectFrame(t, r, f, payloadMethods[0])
		waitWriter(t, done)
		// At EOF Idle reports the end rather than idleness.
		c.SetReadDeadline(time.Now().Add(testTimeout))
		if err := waitReadable(c); err != nil {
			t.Fatal(err)
		}
		if idle, err := r.Idle(); idle || err != io.EOF {
			t.Fatalf("Idle at EOF: %v, %v", idle, err)
		}
		if r.buf != nil {
			t.Fatal("a Reader at EOF holds a buffer")
		}
	})
	t.Run("no descriptor", func(t *testing.T) {
		_, c := pipePair(t)
		r := NewReader(c, nil)
		if idle, err := r.Idle(); idle || err != nil {
			t.Fatalf("Idle on a pipe: %v, %v; it cannot tell, so it must say no", idle, err)
		}
	})
}

// waitReadable blocks until c has something to read (or an error, EOF
// included), without reading it.
func waitReadable(c net.Conn) error {
	raw, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		return err
	}
	var buf [1]byte
	var perr error
	err = raw.Read(func(fd uintptr) bool {
		_, _, errno := syscall.Recvfrom(int(fd), buf[:], syscall.MSG_PEEK)
		if errno == syscall.EAGAIN {
			return false
		}
		perr = errno
		return true
	})
	if err != nil {
		return err
	}
	return perr
}

// TestReaderWait: Wait buffers what arrives, and a deadline ends it with
// nothing held.
func TestReaderWait(t *testing.T) {
	w, c := tcpPair(t)
	r := newTestReader(t, c, nil)
	c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if err := r.Wait(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Wait on a quiet socket: %v, want a deadline error", err)
	}
	if r.buf != nil {
		t.Fatal("a Reader whose Wait timed out holds a buffer")
	}
	c.SetReadDeadline(time.Now().Add(testTimeout))
	f := makeFrame(ws.OpText, true, true, 50, 1)
	done := writeChunks(t, w, 0, true, f.wire())
	if err := r.Wait(); err != nil {
		t.Fatal(err)
	}
	if r.Buffered() == 0 {
		t.Fatal("Wait returned with nothing buffered")
	}
	expectFrame(t, r, f, payloadMethods[0])
	waitWriter(t, done)
}

// serveSink records the whole frames Serve hands it, up to limit bytes of
// payload each, and tells the test after each burst.
type serveSink struct {
	r      *Reader
	limit  int64
	got    []testFrame
	stopAt int           // stop (return false) after this many frames; 0: never
	burst  chan struct{} // a send after every call that consumed frames
	readIn bool          // read one byte past the buffer: must fail, not hang
	inErr  error
}

func (s *serveSink) Frames() bool {
	for s.r.Whole(s.limit) {
		h, _, err := s.r.ReadHeader()
		if err != nil {
			s.inErr = err
			return false
		}
		p := make([]byte, h.Length)
		if err := s.r.ReadFull(p); err != nil {
			s.inErr = err
			return false
		}
		if h.Masked {
			ws.Cipher(p, h.Mask, 0)
		}
		s.got = append(s.got, testFrame{h: h, payload: p})
		if s.stopAt > 0 && len(s.got) == s.stopAt {
			return false
		}
	}
	if s.readIn {
		var b [1]byte
		s.inErr = s.r.ReadSmall(b[:])
		return false
	}
	if s.r.Buffered() > 0 {
		return false
	}
	s.burst <- struct{}{}
	return true
}

// TestReaderServe: one Serve forwards whole frames burst after burst, the
// wait between bursts inside it, and returns with the start of a frame
// that is not whole, or too large for the sink, left buffered.
func TestReaderServe(t *testing.T) {
	small1 := makeFrame(ws.OpText, true, true, 50, 1)
	small2 := makeFrame(ws.OpBinary, true, false, 300, 2)
	split := makeFrame(ws.OpBinary, true, false, 900, 3)
	large := makeFrame(ws.OpBinary, true, false, 2000, 4)
	for _, tc := range []struct {
		name string
		last testFrame
		cut  int // bytes of last sent in the final burst
	}{
		{"a frame not here whole", split, 10},
		{"a header not here whole", split, 1},
		{"a frame over the limit", large, len(large.wire())},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w, c := tcpPair(t)
			r := newTestReader(t, c, nil)
			sink := &serveSink{r: r, limit: 1000, burst: make(chan struct{}, 1)}
			bursts := [][]byte{small1.wire(), small2.wire(), tc.last.wire()[:tc.cut]}
			served := make(chan error, 1)
			go func() { served <- r.Serve(sink) }()
			for i, b := range bursts {
				if _, err := w.Write(b); err != nil {
					t.Fatal(err)
				}
				if i == len(bursts)-1 {
					break
				}
				select {
				case <-sink.burst: // consumed inside the same Serve
				case err := <-served:
					t.Fatalf("Serve returned after burst %d: %v", i+1, err)
				case <-time.After(testTimeout):
					t.Fatalf("burst %d never reached the sink", i+1)
				}
			}
			if err := <-served; err != nil {
				t.Fatal(err)
			}
			if len(sink.got) != 2 || !bytes.Equal(sink.got[0].payload, small1.payload) || !bytes.Equal(sink.got[1].payload, small2.payload) {
				t.Fatalf("the sink got %d frames, want the 2 whole small ones in order", len(sink.got))
			}
			if r.Buffered() != tc.cut {
				t.Fatalf("Serve left %d bytes buffered, want the %d of the last frame", r.Buffered(), tc.cut)
			}
			done := writeChunks(t, w, 0, true, tc.last.wire()[tc.cut:])
			expectFrame(t, r, tc.last, payloadMethods[0])
			waitWriter(t, done)
		})
	}
}

// TestReaderServeEnds: a sink that stops keeps the frames after it
// buffered; a deadline ends Serve with no buffer held; a sink that reads
// past the buffer gets an error, not a wait on the read lock Serve holds.
func TestReaderServeEnds(t *testing.T) {
	t.Run("sink stops", func(t *testing.T) {
		w, c := tcpPair(t)
		r := newTestReader(t, c, nil)
		frames := manySmallFrames(5)
		sink := &serveSink{r: r, limit: 1000, stopAt: 2, burst: make(chan struct{}, 1)}
		done := writeChunks(t, w, 0, false, wireOf(frames...))
		waitWriter(t, done)
		if err := r.Serve(sink); err != nil {
			t.Fatal(err)
		}
		if len(sink.got) != 2 {
			t.Fatalf("the sink got %d frames, want 2", len(sink.got))
		}
		for _, f := range frames[2:] {
			expectFrame(t, r, f, payloadMethods[0])
		}
	})
	t.Run("deadline", func(t *testing.T) {
		_, c := tcpPair(t)
		r := newTestReader(t, c, nil)
		c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		sink := &serveSink{r: r, limit: 1000, burst: make(chan struct{}, 1)}
		if err := r.Serve(sink); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("Serve on a quiet socket: %v, want a deadline error", err)
		}
		if r.buf != nil {
			t.Fatal("a Reader whose Serve timed out holds a buffer")
		}
	})
	t.Run("read inside", func(t *testing.T) {
		w, c := tcpPair(t)
		r := newTestReader(t, c, nil)
		sink := &serveSink{r: r, limit: 1000, readIn: true, burst: make(chan struct{}, 1)}
		waitWriter(t, writeChunks(t, w, 0, false, makeFrame(ws.OpText, true, false, 10, 5).wire()))
		if err := r.Serve(sink); err != nil {
			t.Fatal(err)
		}
		if !errors.Is(sink.inErr, errServing) {
			t.Fatalf("a read past the buffer inside Serve: %v, want errServing", sink.inErr)
		}
	})
	t.Run("eof", func(t *testing.T) {
		w, c := tcpPair(t)
		r := newTestReader(t, c, nil)
		sink := &serveSink{r: r, limit: 1000, burst: make(chan struct{}, 2)}
		f := makeFrame(ws.OpText, true, false, 10, 6)
		waitWriter(t, writeChunks(t, w, 0, true, f.wire()))
		if err := r.Serve(sink); !errors.Is(err, io.EOF) {
			t.Fatalf("Serve to the end of the stream: %v, want EOF", err)
		}
		if len(sink.got) != 1 || r.buf != nil {
			t.Fatalf("the sink got %d frames (want 1); buffer held: %v", len(sink.got), r.buf != nil)
		}
	})
}

func TestReaderWhole(t *testing.T) {
	msb := []byte{0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 1}
	// A 10-byte payload with its length in 64 bits: legal, if not minimal,
	// and small enough for the read buffer.
	long := append([]byte{0x82, 127, 0, 0, 0, 0, 0, 0, 0, 10}, make([]byte, 10)...)
	for _, tc := range []struct {
		name  string
		wire  []byte
		limit int64
		want  bool
	}{
		{"7-bit whole", makeFrame(ws.OpText, true, false, 100, 1).wire(), 1000, true},
		{"7-bit masked whole", makeFrame(ws.OpText, true, true, 100, 1).wire(), 1000, true},
		{"7-bit a byte short", makeFrame(ws.OpText, true, true, 100, 1).wire()[:105], 1000, false},
		{"16-bit whole", makeFrame(ws.OpBinary, true, false, 300, 1).wire(), 1000, true},
		{"16-bit over the limit", makeFrame(ws.OpBinary, true, false, 300, 1).wire(), 299, false},
		{"16-bit length cut", makeFrame(ws.OpBinary, true, false, 300, 1).wire()[:3], 1000, false},
		{"64-bit whole", long, 1 << 20, true},
		{"64-bit a byte short", long[:len(long)-1], 1 << 20, false},
		{"64-bit length cut", makeFrame(ws.OpBinary, true, false, 70000, 1).wire()[:9], 1 << 20, false},
		{"64-bit top bit", msb, 1 << 62, false},
		{"mask cut", makeFrame(ws.OpPing, true, true, 0, 1).wire()[:5], 1000, false},
		{"empty ping", makeFrame(ws.OpPing, true, false, 0, 1).wire(), 0, true},
		{"one byte", []byte{0x81}, 1000, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w, c := tcpPair(t)
			r := newTestReader(t, c, nil)
			waitWriter(t, writeChunks(t, w, 0, true, tc.wire))
			for r.Buffered() < len(tc.wire) {
				if err := r.fill(); err != nil {
					t.Fatal(err)
				}
			}
			if got := r.Whole(tc.limit); got != tc.want {
				t.Fatalf("Whole(%d) = %v, want %v", tc.limit, got, tc.want)
			}
		})
	}
}
