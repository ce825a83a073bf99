package wstest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/gobwas/ws"
)

// Frame is one frame as seen on the wire, payload unmasked.
type Frame struct {
	Fin     bool
	Rsv     byte
	Op      ws.OpCode
	Masked  bool
	Payload []byte
}

func (f Frame) String() string {
	return fmt.Sprintf("{op=%d fin=%v rsv=%d masked=%v len=%d %q}", f.Op, f.Fin, f.Rsv, f.Masked, len(f.Payload), Truncate(f.Payload))
}

// Encode renders f, masking it with a fresh key when f.Masked.
func Encode(f Frame) []byte {
	h := ws.Header{Fin: f.Fin, Rsv: f.Rsv, OpCode: f.Op, Length: int64(len(f.Payload)), Masked: f.Masked}
	p := append([]byte(nil), f.Payload...)
	if f.Masked {
		h.Mask = ws.NewMask()
		ws.Cipher(p, h.Mask, 0)
	}
	var b bytes.Buffer
	ws.WriteHeader(&b, h)
	b.Write(p)
	return b.Bytes()
}

// MaxPayload bounds what ReadFrame allocates on a peer's word.
const MaxPayload = 64 << 20

// ReadFrame reads one frame from r, of at most MaxPayload bytes.
func ReadFrame(r io.Reader) (Frame, error) { return ReadFrameMax(r, MaxPayload) }

// ReadFrameMax reads one frame from r whose payload is at most max bytes;
// the header is checked before anything is allocated for the payload.
func ReadFrameMax(r io.Reader, max int64) (Frame, error) {
	h, err := ws.ReadHeader(r)
	if err != nil {
		return Frame{}, err
	}
	if h.Length > max {
		return Frame{}, fmt.Errorf("frame of %d bytes, more than the %d the test expects", h.Length, max)
	}
	p := make([]byte, h.Length)
	if _, err := io.ReadFull(r, p); err != nil {
		return Frame{}, err
	}
	if h.Masked {
		ws.Cipher(p, h.Mask, 0)
	}
	return Frame{Fin: h.Fin, Rsv: h.Rsv, Op: h.OpCode, Masked: h.Masked, Payload: p}, nil
}

// ReadFrames reads frames of at most max bytes from r, c's reader (c
// itself when r is nil), within IOTimeout: n of them, or with n < 0 until
// a close frame, which is included. It returns the frames read and the
// error that ended the reading, nil after the last one.
func ReadFrames(c net.Conn, r io.Reader, n int, max int64) ([]Frame, error) {
	if r == nil {
		r = c
	}
	c.SetReadDeadline(time.Now().Add(IOTimeout))
	defer c.SetReadDeadline(time.Time{})
	var out []Frame
	for n < 0 || len(out) < n {
		f, err := ReadFrameMax(r, max)
		if err != nil {
			return out, err
		}
		out = append(out, f)
		if n < 0 && f.Op == ws.OpClose {
			break
		}
	}
	return out, nil
}

// CloseOf parses the payload of a close frame: 1005 when it has no code.
func CloseOf(f Frame) (ws.StatusCode, string) {
	if len(f.Payload) < 2 {
		return ws.StatusNoStatusRcvd, ""
	}
	return ws.ParseCloseFrameData(f.Payload)
}

// IsReset reports whether err is a connection reset by the peer.
func IsReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset")
}

// IsEnd reports whether err is how a socket the peer closed ends: EOF,
// a reset, or the socket closed here.
func IsEnd(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || IsReset(err)
}

// Truncate renders b for a message, cut to 64 bytes.
func Truncate(b []byte) string {
	if len(b) > 64 {
		return string(b[:64]) + "..."
	}
	return string(b)
}
