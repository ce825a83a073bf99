package frame

import (
	"encoding/binary"
	"unicode/utf8"

	"github.com/gobwas/ws"
)

// ParseClose validates the unmasked payload of a close frame and returns its
// code and reason. An empty payload carries no code: it returns
// ws.StatusNoStatusRcvd (1005), which must never be sent on.
func ParseClose(p []byte) (code ws.StatusCode, reason []byte, err error) {
	switch len(p) {
	case 0:
		return ws.StatusNoStatusRcvd, nil, nil
	case 1:
		return 0, nil, ErrCloseTooShort
	}
	code = ws.StatusCode(binary.BigEndian.Uint16(p))
	if !ValidCloseCode(code) {
		return code, nil, ErrCloseCode
	}
	reason = p[2:]
	if !utf8.Valid(reason) {
		return code, nil, ErrCloseReasonUTF8
	}
	return code, reason, nil
}
