package frame

import (
	"encoding/binary"

	"github.com/gobwas/ws"
)

// MaxHeaderSize is the longest a frame header can be.
const MaxHeaderSize = ws.MaxHeaderSize

// MaxControlFrame is the longest a control frame can be on the wire:
// a masked header and 125 bytes of payload.
const MaxControlFrame = 6 + ws.MaxControlFramePayloadSize

// PutHeader encodes h at the start of b, which must hold MaxHeaderSize bytes,
// and returns the number of bytes written.
func PutHeader(b []byte, h ws.Header) int {
	_ = b[MaxHeaderSize-1]
	b[0] = h.Rsv<<4 | byte(h.OpCode)
	if h.Fin {
		b[0] |= 0x80
	}
	var n int
	switch {
	case h.Length <= 125:
		b[1] = byte(h.Length)
		n = 2
	case h.Length <= 0xffff:
		b[1] = 126
		binary.BigEndian.PutUint16(b[2:], uint16(h.Length))
		n = 4
	default:
		b[1] = 127
		binary.BigEndian.PutUint64(b[2:], uint64(h.Length))
		n = 10
	}
	if h.Masked {
		b[1] |= 0x80
		n += copy(b[n:], h.Mask[:])
	}
	return n
}

// AppendControl appends a control frame with the given payload (at most 125
// bytes) to dst. With masked set the frame is masked with a fresh key, as
// frames that a proxy originates toward a server must be.
func AppendControl(dst []byte, op ws.OpCode, payload []byte, masked bool) []byte {
	h := ws.Header{Fin: true, OpCode: op, Length: int64(len(payload)), Masked: masked}
	if masked {
		h.Mask = ws.NewMask()
	}
	var hb [MaxHeaderSize]byte
	n := PutHeader(hb[:], h)
	dst = append(dst, hb[:n]...)
	start := len(dst)
	dst = append(dst, payload...)
	if masked {
		ws.Cipher(dst[start:], h.Mask, 0)
	}
	return dst
}

// AppendClose appends a close frame with code and reason to dst. The reason
// is cut to fit the 125-byte limit at a UTF-8 boundary.
func AppendClose(dst []byte, code ws.StatusCode, reason string, masked bool) []byte {
	var p [ws.MaxControlFramePayloadSize]byte
	binary.BigEndian.PutUint16(p[:], uint16(code))
	n := 2 + copy(p[2:], reason)
	// When the reason was cut, reason[n-2] is the first byte left out; back
	// up until it starts a rune, so no rune is split.
	for n > 2 && n-2 < len(reason) && !utf8RuneStart(reason[n-2]) {
		n--
	}
	return AppendControl(dst, ws.OpClose, p[:n], masked)
}

// utf8RuneStart reports whether b can start a UTF-8 sequence, so cutting
// before it leaves the preceding text whole.
func utf8RuneStart(b byte) bool { return b&0xC0 != 0x80 }
