package frame

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
	"unicode/utf8"

	"github.com/gobwas/ws"
)

// FuzzParseClose feeds arbitrary close payloads (unmasked, as the reader
// hands them over) to ParseClose. It must not panic; what it accepts must
// be sendable (a valid code, a UTF-8 reason) and survive AppendClose and
// ParseClose again; what it refuses must carry 1002 or 1007 for the right
// reason.
func FuzzParseClose(f *testing.F) {
	// The committed corpus in testdata/fuzz/FuzzParseClose holds the
	// interesting payloads; these keep `go test` meaningful without it.
	f.Add([]byte{})
	f.Add([]byte{0x03, 0xe8})
	f.Add([]byte("\x03\xe8ok\xff"))
	f.Fuzz(func(t *testing.T, p []byte) {
		code, reason, err := ParseClose(p)
		if err != nil {
			checkCloseRefusal(t, p, err)
			return
		}
		if len(p) == 0 {
			if code != ws.StatusNoStatusRcvd || reason != nil {
				t.Fatalf("ParseClose(empty) = %d, %q; want 1005, nil", code, reason)
			}
			return
		}
		if len(p) < 2 {
			t.Fatalf("ParseClose(%x) accepted a %d-byte payload", p, len(p))
		}
		if want := ws.StatusCode(binary.BigEndian.Uint16(p)); code != want {
			t.Fatalf("code = %d, want %d from the payload", code, want)
		}
		if !ValidCloseCode(code) || code < 1000 || code > 4999 ||
			code == ws.StatusNoStatusRcvd || code == ws.StatusAbnormalClosure || code == 1004 || code == 1015 {
			t.Fatalf("ParseClose accepted close code %d", code)
		}
		if !utf8.Valid(reason) {
			t.Fatalf("ParseClose accepted a reason that is not UTF-8: %q", reason)
		}
		if !bytes.Equal(reason, p[2:]) {
			t.Fatalf("reason = %q, want %q", reason, p[2:])
		}
		for _, masked := range []bool{false, true} {
			checkCloseRoundTrip(t, code, reason, masked)
		}
	})
}

// checkCloseRefusal checks that ParseClose refused p for the right reason,
// with the close code the peer must get.
func checkCloseRefusal(t *testing.T, p []byte, err error) {
	t.Helper()
	var fe *Error
	if !errors.As(err, &fe) {
		t.Fatalf("ParseClose(%x): error %v is not a *frame.Error", p, err)
	}
	var want *Error
	switch {
	case len(p) == 1:
		want = ErrCloseTooShort
	case len(p) == 0:
		t.Fatalf("ParseClose(empty) refused: %v", err)
	case !ValidCloseCode(ws.StatusCode(binary.BigEndian.Uint16(p))):
		want = ErrCloseCode
	case !utf8.Valid(p[2:]):
		want = ErrCloseReasonUTF8
	default:
		t.Fatalf("ParseClose(%q) refused a valid payload: %v", p, err)
	}
	if fe != want {
		t.Fatalf("ParseClose(%q) = %v, want %v", p, err, want)
	}
	if fe.Code != ws.StatusProtocolError && fe.Code != ws.StatusInvalidFramePayloadData {
		t.Fatalf("ParseClose(%q): close code %d for the peer, want 1002 or 1007", p, fe.Code)
	}
	if len(fe.Reason) > ws.MaxControlFramePayloadSize-2 {
		t.Fatalf("error reason of %d bytes does not fit a close frame", len(fe.Reason))
	}
}

// checkCloseRoundTrip encodes code and reason with AppendClose behind some
// bytes already in dst, decodes the frame, and parses its payload again.
func checkCloseRoundTrip(t *testing.T, code ws.StatusCode, reason []byte, masked bool) {
	t.Helper()
	prefix := []byte("keep")
	wire := AppendClose(append([]byte(nil), prefix...), code, string(reason), masked)
	if !bytes.HasPrefix(wire, prefix) {
		t.Fatalf("AppendClose overwrote dst: %q", wire[:len(prefix)])
	}
	h, payload, rest := readFrame(t, wire[len(prefix):])
	if !h.Fin || h.OpCode != ws.OpClose || h.Rsv != 0 || h.Masked != masked {
		t.Fatalf("AppendClose header = %+v, want a final close frame, masked %v", h, masked)
	}
	if h.Length > ws.MaxControlFramePayloadSize || len(rest) != 0 {
		t.Fatalf("close payload of %d bytes, %d more on the wire", h.Length, len(rest))
	}
	code2, reason2, err := ParseClose(payload)
	if err != nil {
		t.Fatalf("ParseClose(AppendClose(%d, %q)) = %v", code, reason, err)
	}
	if code2 != code {
		t.Fatalf("round trip: code %d, want %d", code2, code)
	}
	const room = ws.MaxControlFramePayloadSize - 2
	if len(reason) <= room {
		if !bytes.Equal(reason2, reason) {
			t.Fatalf("round trip: reason %q, want %q", reason2, reason)
		}
		return
	}
	// Cut to fit: a prefix, whole runes, no more than one rune short.
	if !bytes.HasPrefix(reason, reason2) || len(reason2) > room || len(reason2) < room-(utf8.UTFMax-1) {
		t.Fatalf("reason of %d bytes cut to %d: %q", len(reason), len(reason2), reason2)
	}
}
