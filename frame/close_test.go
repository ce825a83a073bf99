package frame

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/gobwas/ws"
)

func closePayload(code uint16, reason string) []byte {
	p := binary.BigEndian.AppendUint16(nil, code)
	return append(p, reason...)
}

func TestParseClose(t *testing.T) {
	t.Run("empty", func(t *testing.T) {
		for _, p := range [][]byte{nil, {}} {
			code, reason, err := ParseClose(p)
			if err != nil || code != ws.StatusNoStatusRcvd || reason != nil {
				t.Fatalf("ParseClose(%v) = %d, %q, %v; want 1005, nil, nil", p, code, reason, err)
			}
		}
	})
	t.Run("one byte", func(t *testing.T) {
		_, _, err := ParseClose([]byte{0x03})
		if err != ErrCloseTooShort || ErrCloseTooShort.Code != ws.StatusProtocolError {
			t.Fatalf("got %v, want %v", err, ErrCloseTooShort)
		}
	})

	codes := []struct {
		code  uint16
		valid bool
	}{
		{0, false},
		{999, false},
		{1000, true},
		{1001, true},
		{1002, true},
		{1003, true},
		{1004, false}, // reserved
		{1005, false}, // no status: local only
		{1006, false}, // abnormal closure: local only
		{1007, true},
		{1008, true},
		{1009, true},
		{1010, true},
		{1011, true},
		{1012, true},  // service restart (IANA)
		{1013, true},  // try again later (IANA)
		{1014, true},  // bad gateway (IANA)
		{1015, false}, // TLS handshake: local only
		{1016, false},
		{2000, false},
		{2999, false},
		{3000, true},
		{3999, true},
		{4000, true},
		{4999, true},
		{5000, false},
		{65535, false},
	}
	for _, tc := range codes {
		for _, reason := range []string{"", "bye", "ünïcödé ✓"} {
			p := closePayload(tc.code, reason)
			code, got, err := ParseClose(p)
			if ValidCloseCode(ws.StatusCode(tc.code)) != tc.valid {
				t.Errorf("ValidCloseCode(%d) = %v, want %v", tc.code, !tc.valid, tc.valid)
			}
			if code != ws.StatusCode(tc.code) {
				t.Errorf("code %d: parsed %d", tc.code, code)
			}
			if !tc.valid {
				if err != ErrCloseCode {
					t.Errorf("code %d reason %q: err %v, want %v", tc.code, reason, err, ErrCloseCode)
				}
				continue
			}
			if err != nil || string(got) != reason {
				t.Errorf("code %d reason %q: got %q, %v", tc.code, reason, got, err)
			}
		}
	}

	t.Run("invalid utf8 reason", func(t *testing.T) {
		for _, reason := range []string{"\xff", "ok\xc3", "\xed\xa0\x80" /* surrogate */, "\xc0\xaf" /* overlong */} {
			code, got, err := ParseClose(closePayload(1000, reason))
			if err != ErrCloseReasonUTF8 || got != nil || code != 1000 {
				t.Errorf("reason %q: got %d, %q, %v; want 1000, nil, %v", reason, code, got, err, ErrCloseReasonUTF8)
			}
			if ErrCloseReasonUTF8.Code != ws.StatusInvalidFramePayloadData {
				t.Errorf("code %d, want 1007", ErrCloseReasonUTF8.Code)
			}
		}
	})
	t.Run("bad code wins over bad reason", func(t *testing.T) {
		if _, _, err := ParseClose(closePayload(999, "\xff")); err != ErrCloseCode {
			t.Fatalf("got %v, want %v", err, ErrCloseCode)
		}
	})
}

// readFrame splits one frame off b and returns its header and unmasked
// payload, using gobwas/ws as the independent decoder.
func readFrame(t *testing.T, b []byte) (ws.Header, []byte, []byte) {
	t.Helper()
	r := bytes.NewReader(b)
	h, err := ws.ReadHeader(r)
	if err != nil {
		t.Fatalf("ws.ReadHeader: %v", err)
	}
	if int64(r.Len()) < h.Length {
		t.Fatalf("frame of %d bytes, %d left", h.Length, r.Len())
	}
	p := make([]byte, h.Length)
	_, _ = r.Read(p)
	if h.Masked {
		ws.Cipher(p, h.Mask, 0)
	}
	return h, p, b[len(b)-r.Len():]
}

func TestAppendCloseRoundTrip(t *testing.T) {
	codes := []ws.StatusCode{ws.StatusNormalClosure, ws.StatusGoingAway, ws.StatusPolicyViolation,
		ws.StatusMessageTooBig, StatusServiceRestart, StatusTryAgainLater, StatusBadGateway, 3000, 4999}
	reasons := []string{"", "x", "going away", "ünïcödé ✓", strings.Repeat("a", 123)}
	for _, masked := range []bool{false, true} {
		for _, code := range codes {
			for _, reason := range reasons {
				checkCloseRoundTrip(t, code, []byte(reason), masked)
			}
		}
	}
}

func TestAppendCloseMaskedOnWire(t *testing.T) {
	// The payload on the wire must differ from the plain text unless the
	// key happens to be zero; try a few times to rule out bad luck.
	plain := AppendClose(nil, 1000, "some reason", false)
	for i := 0; i < 8; i++ {
		m := AppendClose(nil, 1000, "some reason", true)
		if len(m) != len(plain)+4 {
			t.Fatalf("masked frame of %d bytes, want %d", len(m), len(plain)+4)
		}
		if !bytes.Equal(m[6:], plain[2:]) {
			return
		}
	}
	t.Fatal("masked payload is sent in the clear")
}

func TestAppendCloseTruncates(t *testing.T) {
	reasons := []string{
		strings.Repeat("a", 123),
		strings.Repeat("a", 124),
		strings.Repeat("a", 500),
		strings.Repeat("é", 100),       // 2-byte runes: 123 is odd, cut to 122
		"a" + strings.Repeat("é", 100), // 2-byte runes at odd offsets: 123 fits
		strings.Repeat("€", 60),        // 3-byte runes: 41 of them fit exactly
		"a" + strings.Repeat("€", 60),  // 3-byte runes offset by one
		"ab" + strings.Repeat("€", 60), // 3-byte runes offset by two
		strings.Repeat("😀", 40),        // 4-byte runes: 30 fit
		"abc" + strings.Repeat("😀", 40),
		strings.Repeat("a", 119) + "😀", // ends exactly at the limit
		strings.Repeat("a", 120) + "😀", // the limit falls inside the last rune
		strings.Repeat("a", 121) + "😀",
		strings.Repeat("a", 122) + "😀",
	}
	for _, masked := range []bool{false, true} {
		for _, reason := range reasons {
			b := AppendClose(nil, 1001, reason, masked)
			h, p, _ := readFrame(t, b)
			if h.Length > ws.MaxControlFramePayloadSize {
				t.Fatalf("reason of %d bytes: payload of %d bytes", len(reason), h.Length)
			}
			code, got, err := ParseClose(p)
			if err != nil || code != 1001 {
				t.Fatalf("reason %q: %d, %v", reason, code, err)
			}
			if !utf8.Valid(got) || !strings.HasPrefix(reason, string(got)) {
				t.Fatalf("reason cut to %q", got)
			}
			// The cut is as late as possible: one more rune would not fit.
			if len(got) < len(reason) {
				_, size := utf8.DecodeRuneInString(reason[len(got):])
				if 2+len(got)+size <= ws.MaxControlFramePayloadSize {
					t.Fatalf("reason of %d bytes cut to %d, but the next rune of %d bytes fits", len(reason), len(got), size)
				}
			}
		}
	}
}

func TestAppendControl(t *testing.T) {
	for _, op := range []ws.OpCode{ws.OpPing, ws.OpPong, ws.OpClose} {
		for _, n := range []int{0, 1, 125} {
			payload := bytes.Repeat([]byte{'p'}, n)
			for _, masked := range []bool{false, true} {
				b := AppendControl(nil, op, payload, masked)
				want := 2 + n
				if masked {
					want += 4
				}
				if len(b) != want || len(b) > MaxControlFrame {
					t.Fatalf("frame of %d bytes, want %d (max %d)", len(b), want, MaxControlFrame)
				}
				h, p, _ := readFrame(t, b)
				if !h.Fin || h.OpCode != op || h.Masked != masked || !bytes.Equal(p, payload) {
					t.Fatalf("op %v masked %v: %+v %q", op, masked, h, p)
				}
				if string(payload) != strings.Repeat("p", n) {
					t.Fatal("payload modified in place")
				}
			}
		}
	}
}

func TestPutHeaderMatchesGobwas(t *testing.T) {
	lengths := []int64{0, 1, 125, 126, 127, 65535, 65536, 1 << 32, 1<<63 - 1}
	for _, length := range lengths {
		for _, masked := range []bool{false, true} {
			for _, op := range []ws.OpCode{ws.OpContinuation, ws.OpText, ws.OpBinary, ws.OpClose, ws.OpPing, ws.OpPong} {
				for _, fin := range []bool{false, true} {
					for rsv := byte(0); rsv < 8; rsv++ {
						h := ws.Header{Fin: fin, Rsv: rsv, OpCode: op, Masked: masked, Length: length}
						if masked {
							h.Mask = [4]byte{0xde, 0xad, 0xbe, 0xef}
						}
						var want bytes.Buffer
						if err := ws.WriteHeader(&want, h); err != nil {
							t.Fatal(err)
						}
						var b [MaxHeaderSize]byte
						for i := range b {
							b[i] = 0xaa // must not leak into the header
						}
						n := PutHeader(b[:], h)
						if !bytes.Equal(b[:n], want.Bytes()) {
							t.Fatalf("%+v: PutHeader % x, ws.WriteHeader % x", h, b[:n], want.Bytes())
						}
						back, err := ws.ReadHeader(bytes.NewReader(b[:n]))
						if err != nil || back != h {
							t.Fatalf("%+v: read back %+v, %v", h, back, err)
						}
					}
				}
			}
		}
	}
}
