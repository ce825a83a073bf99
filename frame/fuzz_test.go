package frame

import (
	"bytes"
	"errors"
	"io"
	"net"
	"runtime"
	"runtime/metrics"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/gobwas/ws"
)

// streamConn is a net.Conn that serves a fixed byte stream and then io.EOF.
// It has no file descriptor, so a Reader of it takes the buffered path.
type streamConn struct {
	data  []byte
	chunk int  // the most one Read returns; 0 for no limit
	empty bool // return (0, nil) before every read that has data
	gave  bool // the last Read was an empty one
}

// newStreamConn decodes mode: its low 7 bits are the chunk size and its high
// bit asks for empty reads.
func newStreamConn(data []byte, mode uint8) *streamConn {
	return &streamConn{data: data, chunk: int(mode & 0x7f), empty: mode&0x80 != 0}
}

func (c *streamConn) Read(b []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	if len(b) == 0 {
		return 0, nil
	}
	if c.empty && !c.gave {
		c.gave = true
		return 0, nil
	}
	c.gave = false
	n := len(b)
	if c.chunk > 0 {
		n = min(n, c.chunk)
	}
	n = copy(b[:n], c.data)
	c.data = c.data[n:]
	return n, nil
}

func (c *streamConn) Write(b []byte) (int, error)      { return 0, errors.New("streamConn: read only") }
func (c *streamConn) Close() error                     { return nil }
func (c *streamConn) LocalAddr() net.Addr              { return streamAddr{} }
func (c *streamConn) RemoteAddr() net.Addr             { return streamAddr{} }
func (c *streamConn) SetDeadline(time.Time) error      { return nil }
func (c *streamConn) SetReadDeadline(time.Time) error  { return nil }
func (c *streamConn) SetWriteDeadline(time.Time) error { return nil }

type streamAddr struct{}

func (streamAddr) Network() string { return "stream" }
func (streamAddr) String() string  { return "stream" }

const fuzzLimit = 1 << 20

// largeAllocs counts heap objects of more than 32 KiB allocated so far.
// The runtime counts those at once (small ones only when a span is flushed),
// and a buffer sized by a peer's length word would be one of them: the
// Reader's own buffers are 8 KiB.
func largeAllocs() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/allocs-by-size:bytes"}}
	metrics.Read(s)
	h := s[0].Value.Float64Histogram()
	if lo := h.Buckets[len(h.Buckets)-2]; lo <= 32<<10 || lo > 33<<10 {
		panic("runtime/metrics: unexpected last size bucket")
	}
	return h.Counts[len(h.Counts)-1]
}

// totalAlloc is the exact number of bytes allocated so far (ReadMemStats
// flushes the per-P caches that runtime/metrics leaves out).
func totalAlloc() uint64 {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.TotalAlloc
}

// readFrames runs the receive path of a proxy over data: read a header, check
// it, read control payloads (parsing close frames) and skip data payloads. It
// checks what it sees against data and gobwas/ws and returns the error that
// ended the stream.
func readFrames(t *testing.T, data []byte, mode uint8) error {
	r := NewReader(newStreamConn(data, mode), nil)
	defer r.Release()
	c := &Checker{FromClient: true, MaxFrame: fuzzLimit, MaxMessage: fuzzLimit}
	var ctrl [ws.MaxControlFramePayloadSize]byte
	off := 0 // bytes of data consumed so far
	for frames := 0; ; frames++ {
		if frames > len(data)/2 {
			t.Fatalf("%d frames out of %d bytes", frames, len(data))
		}
		h, raw, err := r.ReadHeader()
		if err != nil {
			switch {
			case err == io.EOF:
				if off != len(data) {
					t.Fatalf("io.EOF at %d of %d bytes", off, len(data))
				}
			case err == io.ErrUnexpectedEOF:
				if off >= len(data) || len(data)-off >= MaxHeaderSize {
					t.Fatalf("io.ErrUnexpectedEOF at %d of %d bytes", off, len(data))
				}
			case err == ErrLengthMSB:
				if data[off+1]&0x7f != 127 || data[off+2]&0x80 == 0 {
					t.Fatalf("ErrLengthMSB for % x", data[off:min(off+10, len(data))])
				}
			default:
				t.Fatalf("ReadHeader at %d: unexpected error %v", off, err)
			}
			return err
		}
		if !bytes.Equal(raw, data[off:min(off+len(raw), len(data))]) {
			t.Fatalf("raw header % x, stream has % x at %d", raw, data[off:min(off+len(raw), len(data))], off)
		}
		if gh, gerr := ws.ReadHeader(bytes.NewReader(raw)); gerr != nil || gh != h {
			t.Fatalf("header %+v, gobwas reads % x as %+v, %v", h, raw, gh, gerr)
		}
		off += len(raw)
		if err := c.Check(h); err != nil {
			var fe *Error
			if !errors.As(err, &fe) || (fe.Code != ws.StatusProtocolError && fe.Code != ws.StatusMessageTooBig) {
				t.Fatalf("Check: %v is not a protocol error", err)
			}
			return err
		}
		if h.Length > fuzzLimit {
			t.Fatalf("Checker passed %+v over the limit", h)
		}
		rest := int64(len(data) - off)
		if h.OpCode.IsControl() {
			// Check capped the length at 125: the payload fits on the stack.
			p := ctrl[:h.Length]
			if err := r.ReadFull(p); err != nil {
				if err != io.ErrUnexpectedEOF || rest >= h.Length {
					t.Fatalf("ReadFull of %d with %d left: %v", h.Length, rest, err)
				}
				return err
			}
			if !bytes.Equal(p, data[off:off+len(p)]) {
				t.Fatalf("control payload differs from the stream at %d", off)
			}
			ws.Cipher(p, h.Mask, 0)
			if h.OpCode == ws.OpClose {
				code, reason, err := ParseClose(p)
				if err != nil {
					var fe *Error
					if !errors.As(err, &fe) {
						t.Fatalf("ParseClose: %v", err)
					}
					return err
				}
				if !(len(p) == 0 && code == ws.StatusNoStatusRcvd) && !ValidCloseCode(code) {
					t.Fatalf("ParseClose passed code %d", code)
				}
				if !utf8.Valid(reason) {
					t.Fatalf("ParseClose passed reason %q", reason)
				}
			}
		} else if err := r.Discard(h.Length); err != nil {
			if err != io.ErrUnexpectedEOF || rest >= h.Length {
				t.Fatalf("Discard of %d with %d left: %v", h.Length, rest, err)
			}
			return err
		}
		off += int(h.Length)
	}
}

// FuzzReadFrames feeds arbitrary bytes through the receive path. It must not
// panic, must end with an error or io.EOF, and must not allocate in
// proportion to the lengths the peer claims.
func FuzzReadFrames(f *testing.F) {
	// The committed corpus in testdata/fuzz/FuzzReadFrames holds the
	// interesting streams; one more here keeps `go test` meaningful if it is
	// lost.
	f.Add([]byte("\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"), uint8(0))
	f.Fuzz(func(t *testing.T, data []byte, mode uint8) {
		large, total := largeAllocs(), totalAlloc()
		err := readFrames(t, data, mode)
		if err == nil {
			t.Fatal("the stream ended without an error")
		}
		// The runtime counts the Reader's 32 KiB read buffer, when the
		// pool has none to give, in its last (large) bucket; a second
		// large allocation would be one sized by a header.
		if n := largeAllocs() - large; n > 1 {
			t.Fatalf("%d allocations of 32 KiB or more for %d bytes of input", n, len(data))
		}
		// The Reader, a pooled buffer or two and a little per frame:
		// nothing that grows with the lengths in the headers.
		bound := uint64(96<<10 + 64*len(data))
		if got := totalAlloc() - total; got > bound {
			t.Fatalf("allocated %d bytes for %d bytes of input (bound %d)", got, len(data), bound)
		}
	})
}
