package integration

// The conformance suite's two ends: the plain gorilla echo it compares
// sluice against (served by backend at /conformance), and the raw client
// side that plays a script of bytes and records what comes back.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gobwas/ws"
	gorilla "github.com/gorilla/websocket"

	"github.com/sluice-proxy/sluice/internal/wstest"
)

// serveConformanceEcho is the reference the conformance suite holds sluice
// to: gorilla with nothing configured but an optional read limit. It streams
// each message back with the same opcode (so its own fragmentation is that of
// a full write buffer, the same on either path) and leaves pings to gorilla's
// default handler. It answers protocol errors the way gorilla does: a 1002
// with a reason, then it closes the socket.
func (b *backend) serveConformanceEcho(w http.ResponseWriter, r *http.Request, uc *upstreamConn) {
	up := gorilla.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}
	c, err := up.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	b.track(c.UnderlyingConn())
	defer b.untrack(c.UnderlyingConn())
	defer c.Close()
	if n, _ := strconv.ParseInt(r.URL.Query().Get("limit"), 10, 64); n > 0 {
		c.SetReadLimit(n)
	}
	close(uc.ready)
	for {
		typ, rd, err := c.NextReader()
		if err != nil {
			nonBlockingSend(uc.ended, closeSeenOf(err))
			return
		}
		wr, err := c.NextWriter(typ)
		if err != nil {
			return
		}
		c.SetWriteDeadline(time.Now().Add(wstest.IOTimeout))
		if _, err := io.Copy(wr, rd); err != nil {
			// The read side failed (a limit, a protocol error, a close):
			// gorilla has already answered; what was buffered is dropped.
			return
		}
		if err := wr.Close(); err != nil {
			return
		}
	}
}

// wire is the bytes of one client frame as the script sends them.
type wire struct {
	b     []byte
	close bool // a close frame: the client has started the close handshake
}

// header renders a frame header by hand so that a case can set anything the
// RFC forbids: reserved opcodes and bits, no mask, a length in a longer form
// than needed (lenBytes 2 or 8; 0 picks the shortest) or with the 64-bit
// form's top bit set. mask is nil for an unmasked frame.
func header(fin bool, rsv byte, op ws.OpCode, mask []byte, lenBytes int, length uint64) []byte {
	b0 := byte(op) & 0x0f
	if fin {
		b0 |= 0x80
	}
	b0 |= (rsv & 7) << 4
	var b1 byte
	if mask != nil {
		b1 = 0x80
	}
	if lenBytes == 0 {
		switch {
		case length <= 125:
		case length <= 0xffff:
			lenBytes = 2
		default:
			lenBytes = 8
		}
	}
	h := []byte{b0, b1}
	switch lenBytes {
	case 0:
		h[1] |= byte(length)
	case 2:
		h[1] |= 126
		h = binary.BigEndian.AppendUint16(h, uint16(length))
	case 8:
		h[1] |= 127
		h = binary.BigEndian.AppendUint64(h, length)
	default:
		panic("header: lenBytes must be 0, 2 or 8")
	}
	return append(h, mask...)
}

// frameSpec is one client frame of a script. The zero value of Unmasked
// means masked, as a client must.
type frameSpec struct {
	Fin      bool
	Rsv      byte
	Op       ws.OpCode
	Payload  []byte
	Unmasked bool
	LenBytes int // 0: shortest length form; 2 or 8 to force one
}

func (f frameSpec) wire() wire {
	var mask []byte
	p := append([]byte(nil), f.Payload...)
	if !f.Unmasked {
		m := ws.NewMask()
		mask = m[:]
		ws.Cipher(p, m, 0)
	}
	b := append(header(f.Fin, f.Rsv, f.Op, mask, f.LenBytes, uint64(len(f.Payload))), p...)
	return wire{b: b, close: f.Op == ws.OpClose}
}

// Frame makers for scripts; each returns a masked final frame unless said.
func txt(s string) wire      { return frameSpec{Fin: true, Op: ws.OpText, Payload: []byte(s)}.wire() }
func txtB(p []byte) wire     { return frameSpec{Fin: true, Op: ws.OpText, Payload: p}.wire() }
func bin(p []byte) wire      { return frameSpec{Fin: true, Op: ws.OpBinary, Payload: p}.wire() }
func ping(p []byte) wire     { return frameSpec{Fin: true, Op: ws.OpPing, Payload: p}.wire() }
func pong(p []byte) wire     { return frameSpec{Fin: true, Op: ws.OpPong, Payload: p}.wire() }
func closeRaw(p []byte) wire { return frameSpec{Fin: true, Op: ws.OpClose, Payload: p}.wire() }
func closeW(code ws.StatusCode, reason string) wire {
	return closeRaw(closePayload(code, reason))
}
func frag(fin bool, op ws.OpCode, p []byte) wire {
	return frameSpec{Fin: fin, Op: op, Payload: p}.wire()
}

// confWrite is one step of a script: its frames go out in one write, or in
// chops of chop bytes each (one write per chop; TCP_NODELAY is on, so each
// is a segment of its own).
type confWrite struct {
	frames []wire
	chop   int
}

func (w confWrite) bytes() []byte {
	var b []byte
	for _, f := range w.frames {
		b = append(b, f.b...)
	}
	return b
}

// confFrame is one frame the client received, payload unmasked.
type confFrame struct {
	fin     bool
	rsv     byte
	op      ws.OpCode
	masked  bool
	payload []byte
}

func (f confFrame) String() string {
	s := opName(f.op)
	if !f.fin {
		s += "(more)"
	}
	if f.rsv != 0 {
		s += fmt.Sprintf("[rsv=%d]", f.rsv)
	}
	if f.masked {
		s += "[masked]"
	}
	if len(f.payload) <= 16 {
		return s + fmt.Sprintf(" %q", f.payload)
	}
	return s + fmt.Sprintf(" %d bytes %q...", len(f.payload), f.payload[:16])
}

func (f confFrame) equal(g confFrame) bool {
	return f.fin == g.fin && f.rsv == g.rsv && f.op == g.op && f.masked == g.masked && string(f.payload) == string(g.payload)
}

func opName(op ws.OpCode) string {
	switch op {
	case ws.OpContinuation:
		return "cont"
	case ws.OpText:
		return "text"
	case ws.OpBinary:
		return "binary"
	case ws.OpClose:
		return "close"
	case ws.OpPing:
		return "ping"
	case ws.OpPong:
		return "pong"
	}
	return fmt.Sprintf("op%#x", byte(op))
}

// noClose is confTrace.code when no close frame arrived.
const noClose = -1

// confTrace is what the client observed on one path: every frame up to the
// server's close frame, the close, anything after it, and how the TCP
// connection ended.
type confTrace struct {
	frames     []confFrame // before the close frame, in order
	code       int         // the close frame's code; 1005 for an empty one; noClose
	reason     string
	closeBytes int         // the close frame's payload length
	after      []confFrame // frames after the close frame: none is allowed
	end        string      // "eof", "reset", "timeout" or another read error, with "before close" when no close came
	reset      bool        // the connection ended with ECONNRESET (before or after the close)
	writeErr   error       // the script's writes failed (the server had closed)
}

func (tr confTrace) closeString() string {
	if tr.code == noClose {
		return "no close"
	}
	return fmt.Sprintf("%d %q", tr.code, tr.reason)
}

// play dials addr, sends the script of c on a writer goroutine while it reads
// the server's frames, answers the server's close (once the script is
// written) if the script sent none, and reads on until the connection ends.
// Every read and write has a deadline of wstest.IOTimeout. It calls no t method,
// so it may run on any goroutine; the connection is the caller's.
func play(rc *wstest.Client, c confCase) confTrace {
	var tr confTrace
	written := make(chan error, 1)
	go func() { written <- writeScript(rc.Conn, c.writes) }()

	clientClosed := c.clientCloses()
	waitWritten := func() {
		select {
		case err := <-written:
			tr.writeErr = err
		case <-time.After(2 * wstest.IOTimeout):
			tr.writeErr = errors.New("script writes did not end")
		}
		written = nil
	}
	readEnd := func(err error) string {
		switch {
		case errors.Is(err, io.EOF):
			return "eof"
		case errors.Is(err, syscall.ECONNRESET) || wstest.IsReset(err):
			tr.reset = true
			return "reset"
		case errors.Is(err, os.ErrDeadlineExceeded):
			return "timeout"
		}
		return err.Error()
	}

	tr.code = noClose
	for {
		rc.Conn.SetReadDeadline(time.Now().Add(wstest.IOTimeout))
		f, err := wstest.ReadFrame(rc.BR)
		if err != nil {
			tr.end = readEnd(err) + " before close"
			break
		}
		cf := confFrame{fin: f.Fin, rsv: f.Rsv, op: f.Op, masked: f.Masked, payload: f.Payload}
		if f.Op != ws.OpClose {
			tr.frames = append(tr.frames, cf)
			continue
		}
		tr.closeBytes = len(f.Payload)
		tr.code = int(ws.StatusNoStatusRcvd)
		if len(f.Payload) >= 2 {
			tr.code = int(binary.BigEndian.Uint16(f.Payload))
			tr.reason = string(f.Payload[2:])
		}
		waitWritten()
		if !clientClosed {
			// Echo the code, as RFC 6455 §5.5.1 suggests; an empty close
			// (or one whose code may not be sent) gets an empty one.
			reply := frameSpec{Fin: true, Op: ws.OpClose}
			if len(f.Payload) >= 2 {
				reply.Payload = f.Payload[:2]
			}
			rc.Conn.SetWriteDeadline(time.Now().Add(wstest.IOTimeout))
			rc.Conn.Write(reply.wire().b) // the server may be gone already
		}
		for {
			rc.Conn.SetReadDeadline(time.Now().Add(wstest.IOTimeout))
			f, err := wstest.ReadFrame(rc.BR)
			if err != nil {
				tr.end = readEnd(err)
				break
			}
			tr.after = append(tr.after, confFrame{fin: f.Fin, rsv: f.Rsv, op: f.Op, masked: f.Masked, payload: f.Payload})
		}
		break
	}
	if written != nil {
		waitWritten()
	}
	return tr
}

// writeScript sends each step of a script, in one write or in chops.
func writeScript(conn net.Conn, writes []confWrite) error {
	for i, w := range writes {
		b := w.bytes()
		chop := w.chop
		if chop <= 0 {
			chop = len(b)
		}
		for len(b) > 0 {
			n := min(chop, len(b))
			conn.SetWriteDeadline(time.Now().Add(wstest.IOTimeout))
			if _, err := conn.Write(b[:n]); err != nil {
				return fmt.Errorf("write %d: %w", i, err)
			}
			b = b[n:]
		}
	}
	return nil
}

// describe renders a trace on one line for logs and failure messages.
func (tr confTrace) describe() string {
	var sb strings.Builder
	sb.WriteString("[")
	for i, f := range tr.frames {
		if i == 8 && len(tr.frames) > 10 {
			fmt.Fprintf(&sb, " ... %d more", len(tr.frames)-i)
			break
		}
		if i > 0 {
			sb.WriteString(" ")
		}
		sb.WriteString(f.String())
	}
	fmt.Fprintf(&sb, "] close %s, then %s", tr.closeString(), tr.end)
	if len(tr.after) > 0 {
		fmt.Fprintf(&sb, " (%d frames after the close: %v)", len(tr.after), tr.after[0])
	}
	return sb.String()
}
