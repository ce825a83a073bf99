package frame

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"syscall"

	"github.com/gobwas/ws"
)

// readBufferSize is what a Reader borrows from the pool while bytes wait.
// 32 KiB takes a 16 KiB message, header and payload, in one read: with
// 8 KiB the payload's rest cost a second read, and the broadcast load 12%
// more CPU. A Reader holds it only while unread bytes wait, so an idle
// connection costs none of it.
const readBufferSize = 32 << 10

// Reader reads frames from a connection through a buffer it borrows from the
// pool only while it holds unread bytes. On a socket (a *net.TCPConn or
// anything else with a syscall.RawConn) it waits for readability with no
// buffer at all, so an idle connection costs no buffer memory. Other conns
// (TLS) keep their buffer for the life of the Reader.
//
// A Reader is used by one goroutine at a time.
type Reader struct {
	conn net.Conn
	raw  syscall.RawConn // nil when conn has no file descriptor
	buf  *[]byte         // nil while empty on a raw conn
	r, w int             // unread bytes are (*buf)[r:w]

	// readFn is RawConn.Read's callback, built once: a method value
	// allocates. Idle's one-read look and Serve go through it too (mode), so
	// a Reader is one func value and 144 bytes, a size class.
	readFn        func(fd uintptr) bool
	lastN         int
	lastErr       error
	headerScratch [MaxHeaderSize]byte
	mode          readMode         // what readFn does
	limited       io.LimitedReader // reused by CopyN
	sink          Sink             // Serve's consumer, only during Serve
}

// readMode is what a Reader's RawConn.Read callback does.
type readMode uint8

const (
	modeFill  readMode = iota // read once what the socket has, else wait (fill)
	modePeek                  // read once and never wait (Idle)
	modeServe                 // read and hand whole frames to the sink (Serve)
)

// NewReader returns a Reader of conn. pending holds bytes already read from
// conn during the handshake (a bufio.Reader's leftovers); they are copied.
func NewReader(conn net.Conn, pending []byte) *Reader {
	r := &Reader{conn: conn}
	if sc, ok := conn.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			r.raw = raw
			r.readFn = r.onReadable
		}
	}
	for len(pending) > 0 {
		r.grab()
		n := copy((*r.buf)[r.w:cap(*r.buf)], pending)
		r.w += n
		pending = pending[n:]
		if len(pending) > 0 {
			// Handshake leftovers beyond one buffer are impossible with the
			// 4 KiB bufio readers in use; refuse rather than lose them.
			panic("frame: handshake leftovers exceed the read buffer")
		}
	}
	return r
}

// RawConn is the connection's descriptor access, or nil when it has none
// (and Idle can never report idleness).
func (r *Reader) RawConn() syscall.RawConn { return r.raw }

// Conn is the connection the Reader reads.
func (r *Reader) Conn() net.Conn { return r.conn }

// Buffered is the number of bytes read from the connection but not consumed.
func (r *Reader) Buffered() int { return r.w - r.r }

// Release returns the buffer to the pool. The Reader must not be used again.
func (r *Reader) Release() {
	if r.buf != nil {
		PutBuffer(r.buf)
		r.buf = nil
	}
	r.r, r.w = 0, 0
}

func (r *Reader) grab() {
	if r.buf == nil {
		r.buf = GetBuffer(readBufferSize)
		r.r, r.w = 0, 0
	}
}

// readRaw runs inside RawConn.Read: it reads what the socket has, borrowing
// the buffer only when there is something to read, and returns false to wait
// for readability (after giving an empty buffer back).
func (r *Reader) readRaw(fd uintptr) bool {
	r.grab()
	for {
		n, err := syscall.Read(int(fd), (*r.buf)[r.w:cap(*r.buf)])
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			if r.r == r.w {
				PutBuffer(r.buf)
				r.buf = nil
			}
			return false
		case err != nil:
			r.lastN, r.lastErr = 0, err
		case n == 0:
			r.lastN, r.lastErr = 0, io.EOF
		default:
			r.lastN, r.lastErr = n, nil
		}
		return true
	}
}

// Idle reads what the socket has without waiting and reports whether no
// byte of a next frame has arrived, so that the caller may stop reading
// until the socket is readable again (waiting elsewhere, in an epoll set,
// rather than in a goroutine). It is false when bytes are buffered, after
// a read that got some, and on conns without a file descriptor (TLS may
// hold decrypted bytes the socket does not show). A read error is
// returned; the Reader then holds no buffer.
func (r *Reader) Idle() (bool, error) {
	if r.w > r.r || r.raw == nil {
		return false, nil
	}
	r.r, r.w = 0, 0
	r.lastN, r.lastErr = 0, errWouldBlock
	r.mode = modePeek
	err := r.raw.Read(r.readFn)
	r.mode = modeFill
	if err != nil {
		return false, err
	}
	switch r.lastErr {
	case errWouldBlock:
		return true, nil
	case nil:
		r.w += r.lastN
		return false, nil
	}
	if r.buf != nil {
		PutBuffer(r.buf)
		r.buf = nil
	}
	return false, r.lastErr
}

// Wait waits, under the connection's read deadline, until bytes arrive
// and buffers them; it returns at once when bytes are buffered. On an
// error (a deadline included) the Reader holds no buffer.
func (r *Reader) Wait() error {
	if r.w > r.r {
		return nil
	}
	return r.fill()
}

// errWouldBlock marks a read in Idle that found the socket empty.
var errWouldBlock = errors.New("frame: would block")

// onReadable is the RawConn.Read callback: readRaw; under Idle (modePeek)
// one read and never a wait; under Serve, serveReadable.
func (r *Reader) onReadable(fd uintptr) bool {
	switch r.mode {
	case modePeek:
		if !r.readRaw(fd) {
			// Empty: readRaw gave the buffer back already.
			r.lastN, r.lastErr = 0, errWouldBlock
		}
		return true
	case modeServe:
		return r.serveReadable(fd)
	}
	return r.readRaw(fd)
}

// A Sink consumes frames inside Serve.
type Sink interface {
	// Frames consumes whole frames from the Reader's buffer (Whole says
	// which; ReadHeader, ReadFull, ReadSmall and Discard then need no
	// more bytes) and reports whether Serve goes on: true once the buffer
	// is empty, false to return to Serve's caller with whatever is left
	// buffered. It runs with the socket's read lock held: it must not
	// read the socket, nor wait for anything that does.
	Frames() bool
}

// errServing: a read of the socket from inside Serve's sink, which would
// wait on the read lock Serve holds.
var errServing = errors.New("frame: read from inside Serve")

// Serve waits for bytes like Wait, then, while sink.Frames consumes all
// that arrive, goes on reading and waiting inside the same RawConn.Read:
// a busy socket pays for its locks, readiness reset and read deadline once
// per Serve, not per burst. It returns nil once Frames stops, bytes it
// left buffered; otherwise the read's error, the read deadline's
// included, as Wait does, and then the Reader holds no buffer. Without a
// file descriptor it is Wait.
func (r *Reader) Serve(sink Sink) error {
	if r.w > r.r || r.raw == nil {
		return r.Wait()
	}
	r.r, r.w = 0, 0
	r.lastN, r.lastErr = 0, nil
	r.mode, r.sink = modeServe, sink
	defer r.endServe() // a panic in the sink too
	return r.rawRead()
}

func (r *Reader) endServe() { r.mode, r.sink = modeFill, nil }

// serveReadable is Serve's RawConn.Read callback: it returns false to
// wait for the socket, true to end the RawConn.Read.
func (r *Reader) serveReadable(fd uintptr) bool {
	for {
		if !r.readRaw(fd) {
			return false // empty: wait for the next edge
		}
		if r.lastErr != nil {
			return true
		}
		r.w += r.lastN
		r.lastN = 0
		if !r.sink.Frames() {
			return true
		}
		if r.r != r.w {
			return true // the sink broke its word: let the caller see what is left
		}
		// All consumed: read on until the socket is empty. A short read
		// does not say so: a FIN or a reset that came with the bytes
		// raised its readiness edge before they were read, and only the
		// next read reports it.
		r.r, r.w = 0, 0
	}
}

// Whole reports whether the buffer starts with a whole frame, header and
// payload, whose payload is at most limit bytes. A header with the
// 64-bit length's top bit set is never whole: ReadHeader reports it.
func (r *Reader) Whole(limit int64) bool {
	if r.buf == nil {
		return false
	}
	b := (*r.buf)[r.r:r.w]
	if len(b) < 2 {
		return false
	}
	size := headerSize(b[1])
	if len(b) < size {
		return false
	}
	length := payloadLength(b)
	return length <= uint64(limit) && uint64(len(b)-size) >= length
}

// headerSize is the length of a frame header whose second byte is b1.
func headerSize(b1 byte) int {
	size := 2
	if b1&0x80 != 0 {
		size += 4
	}
	switch b1 & 0x7f {
	case 126:
		size += 2
	case 127:
		size += 8
	}
	return size
}

// payloadLength is the payload length a whole header b declares; a
// 64-bit length with its top bit set is returned as it is (ReadHeader
// refuses it, Whole finds it over any limit).
func payloadLength(b []byte) uint64 {
	switch l := b[1] & 0x7f; l {
	case 126:
		return uint64(binary.BigEndian.Uint16(b[2:]))
	case 127:
		return binary.BigEndian.Uint64(b[2:])
	default:
		return uint64(l)
	}
}

// maxEmptyReads is how many (0, nil) reads in a row fill tolerates before
// giving up with io.ErrNoProgress, as bufio does.
const maxEmptyReads = 100

// fill reads more bytes into the buffer, making room at its end first.
func (r *Reader) fill() error {
	if r.mode == modeServe {
		return errServing
	}
	if r.buf != nil && r.r > 0 {
		if r.r == r.w {
			r.r, r.w = 0, 0
		} else if cap(*r.buf)-r.w < MaxHeaderSize {
			// The buffer has length 0: copy into its full capacity.
			n := copy((*r.buf)[:cap(*r.buf)], (*r.buf)[r.r:r.w])
			r.r, r.w = 0, n
		}
	}
	if r.raw == nil {
		r.grab()
		for range maxEmptyReads {
			n, err := r.conn.Read((*r.buf)[r.w:cap(*r.buf)])
			r.w += n
			if n > 0 {
				return nil
			}
			if err != nil {
				return err
			}
		}
		return io.ErrNoProgress
	}
	if err := r.rawRead(); err != nil {
		return err
	}
	r.w += r.lastN
	return nil
}

// rawRead runs readFn in RawConn.Read and returns its error or the read's.
// A deadline can end the wait before readFn runs, and EOF or a socket
// error ends it with nothing read: the buffer, if empty, goes back then
// too, so a Reader that stops holds none.
func (r *Reader) rawRead() error {
	err := r.raw.Read(r.readFn)
	if err == nil {
		err = r.lastErr
	}
	if err != nil && r.buf != nil && r.r == r.w {
		PutBuffer(r.buf)
		r.buf = nil
	}
	return err
}

// ensure makes at least n (<= MaxHeaderSize) bytes available in the buffer.
func (r *Reader) ensure(n int) error {
	for r.w-r.r < n {
		if err := r.fill(); err != nil {
			if errors.Is(err, io.EOF) && r.w > r.r {
				return io.ErrUnexpectedEOF
			}
			return err
		}
	}
	return nil
}

// ReadHeader reads the next frame header. raw holds its bytes as they came
// on the wire and is valid until the next call on the Reader.
func (r *Reader) ReadHeader() (h ws.Header, raw []byte, err error) {
	if err = r.ensure(2); err != nil {
		return h, nil, err
	}
	size := headerSize((*r.buf)[r.r:r.w][1])
	if err = r.ensure(size); err != nil {
		return h, nil, err
	}
	b := (*r.buf)[r.r : r.r+size]
	h.Fin = b[0]&0x80 != 0
	h.Rsv = (b[0] & 0x70) >> 4
	h.OpCode = ws.OpCode(b[0] & 0x0f)
	h.Masked = b[1]&0x80 != 0
	u := payloadLength(b)
	if u>>63 != 0 {
		return h, nil, ErrLengthMSB
	}
	h.Length = int64(u)
	if h.Masked {
		copy(h.Mask[:], b[size-4:])
	}
	r.r += size
	// The caller may keep reading (and so compacting) before using raw, so
	// hand it a stable copy.
	n := copy(r.headerScratch[:], b)
	return h, r.headerScratch[:n], nil
}

// ReadFull fills p with the next bytes of the stream: what is buffered,
// then, for a large rest, straight from the connection into p.
func (r *Reader) ReadFull(p []byte) error {
	if r.w > r.r {
		n := copy(p, (*r.buf)[r.r:r.w])
		r.r += n
		p = p[n:]
	}
	if len(p) < readBufferSize {
		return r.ReadSmall(p)
	}
	if n, err := io.ReadFull(r.conn, p); err != nil && n < len(p) {
		return unexpected(err)
	}
	return nil
}

// ReadSmall is ReadFull through the Reader's buffer only, meant for small
// p (a control frame's payload): p, never handed to an interface, can
// live on the caller's stack.
func (r *Reader) ReadSmall(p []byte) error {
	for len(p) > 0 {
		if r.w == r.r {
			if err := r.fill(); err != nil {
				return unexpected(err)
			}
		}
		n := copy(p, (*r.buf)[r.r:r.w])
		r.r += n
		p = p[n:]
	}
	return nil
}

// CopyN writes the next n bytes of the stream to dst: first what is
// buffered, then straight from the connection. When both ends are TCP
// sockets the second part is spliced in the kernel (splice(2)).
func (r *Reader) CopyN(dst io.Writer, n int64) (int64, error) {
	var done int64
	if k := int64(r.w - r.r); k > 0 {
		if k > n {
			k = n
		}
		m, err := dst.Write((*r.buf)[r.r : r.r+int(k)])
		r.r += m
		done += int64(m)
		if err != nil {
			return done, err
		}
	}
	if done == n {
		return done, nil
	}
	if r.buf != nil && r.r == r.w && r.raw != nil {
		PutBuffer(r.buf)
		r.buf = nil
	}
	// A LimitedReader of our own, not io.CopyN's, so the copy allocates
	// nothing; *net.TCPConn's ReadFrom turns it into splice(2).
	r.limited = io.LimitedReader{R: r.conn, N: n - done}
	var m int64
	var err error
	if rf, ok := dst.(io.ReaderFrom); ok {
		m, err = rf.ReadFrom(&r.limited)
	} else {
		// TLS and other writers without ReadFrom: copy through a pooled
		// buffer rather than the 32 KiB io.Copy would allocate.
		b := GetBuffer(32 << 10)
		m, err = io.CopyBuffer(struct{ io.Writer }{dst}, &r.limited, (*b)[:cap(*b)])
		PutBuffer(b)
	}
	done += m
	r.limited.R = nil
	if err != nil {
		return done, unexpected(err)
	}
	if done < n {
		return done, io.ErrUnexpectedEOF
	}
	return done, nil
}

// Discard skips the next n bytes of the stream.
func (r *Reader) Discard(n int64) error {
	_, err := r.CopyN(io.Discard, n)
	return err
}

func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// Drain reads and discards everything the connection still sends, until
// its end (then it returns nil), an error or the read deadline. The Reader
// holds no buffer afterwards.
func (r *Reader) Drain() error {
	for {
		r.r = r.w
		if err := r.fill(); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}
