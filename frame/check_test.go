package frame

import (
	"errors"
	"math"
	"testing"

	"github.com/gobwas/ws"
)

// Reserved bit values of ws.Header.Rsv (RSV1 is the high bit of the three).
const (
	rsv1 byte = 0x4
	rsv2 byte = 0x2
	rsv3 byte = 0x1
)

// hdr builds a header; the checker tests set Masked for the direction.
func hdr(op ws.OpCode, fin bool, rsv byte, length int64) ws.Header {
	return ws.Header{Fin: fin, Rsv: rsv, OpCode: op, Length: length}
}

func text(fin bool, n int64) ws.Header { return hdr(ws.OpText, fin, 0, n) }
func bin(fin bool, n int64) ws.Header  { return hdr(ws.OpBinary, fin, 0, n) }
func cont(fin bool, n int64) ws.Header { return hdr(ws.OpContinuation, fin, 0, n) }
func ping(n int64) ws.Header           { return hdr(ws.OpPing, true, 0, n) }
func pong(n int64) ws.Header           { return hdr(ws.OpPong, true, 0, n) }
func closeh(n int64) ws.Header         { return hdr(ws.OpClose, true, 0, n) }

// checkCase is a sequence of headers of one direction: every header but the
// last must pass, and the last must fail with want (or pass when want is nil).
// The benchmarks replay the passing cases.
type checkCase struct {
	name       string
	ext        Extension
	maxFrame   int64
	maxMessage int64
	frames     []ws.Header
	want       *Error
}

var checkCases = func() []checkCase {
	cs := []checkCase{
		// Valid sequences.
		{name: "single text", frames: []ws.Header{text(true, 5)}},
		{name: "single binary empty", frames: []ws.Header{bin(true, 0)}},
		{name: "control frames", frames: []ws.Header{ping(0), pong(125), closeh(2), closeh(0)}},
		{name: "fragmented text with ping", frames: []ws.Header{
			text(false, 3), cont(false, 0), ping(4), cont(false, 10), pong(0), cont(true, 1), text(true, 2),
		}},
		{name: "fragmented binary then close", frames: []ws.Header{bin(false, 1), cont(true, 1), closeh(2)}},
		{name: "close inside fragmented message", frames: []ws.Header{text(false, 1), closeh(2)}},
		{name: "control 125", frames: []ws.Header{ping(125)}},

		// Opcodes.
		{name: "control 126", frames: []ws.Header{ping(126)}, want: ErrControlTooLong},
		{name: "close 126", frames: []ws.Header{closeh(126)}, want: ErrControlTooLong},
		{name: "pong 65536", frames: []ws.Header{pong(65536)}, want: ErrControlTooLong},
		{name: "fragmented ping", frames: []ws.Header{hdr(ws.OpPing, false, 0, 1)}, want: ErrControlFragmented},
		{name: "fragmented close", frames: []ws.Header{hdr(ws.OpClose, false, 0, 2)}, want: ErrControlFragmented},
		{name: "fragmented pong inside message", frames: []ws.Header{text(false, 1), hdr(ws.OpPong, false, 0, 0)}, want: ErrControlFragmented},

		// Fragmentation.
		{name: "continuation without start", frames: []ws.Header{cont(true, 1)}, want: ErrNoMessageToContinue},
		{name: "continuation after final", frames: []ws.Header{text(true, 1), cont(true, 1)}, want: ErrNoMessageToContinue},
		{name: "unfinished continuation after final", frames: []ws.Header{text(false, 1), cont(true, 1), cont(false, 1)}, want: ErrNoMessageToContinue},
		{name: "text inside fragmented text", frames: []ws.Header{text(false, 1), text(true, 1)}, want: ErrContinuationExpected},
		{name: "binary inside fragmented text", frames: []ws.Header{text(false, 1), ping(0), bin(false, 1)}, want: ErrContinuationExpected},
		{name: "text after continuation", frames: []ws.Header{bin(false, 1), cont(false, 1), text(true, 1)}, want: ErrContinuationExpected},

		// Limits.
		{name: "frame at limit", maxFrame: 100, frames: []ws.Header{text(true, 100)}},
		{name: "frame over limit", maxFrame: 100, frames: []ws.Header{text(true, 101)}, want: ErrFrameTooBig},
		{name: "continuation over frame limit", maxFrame: 100, frames: []ws.Header{text(false, 100), cont(true, 101)}, want: ErrFrameTooBig},
		{name: "control not bound by small frame limit", maxFrame: 10, frames: []ws.Header{ping(125)}},
		{name: "message at limit", maxMessage: 100, frames: []ws.Header{text(false, 40), cont(false, 50), ping(125), cont(true, 10)}},
		{name: "message over limit", maxMessage: 100, frames: []ws.Header{text(false, 40), cont(false, 50), ping(125), cont(true, 11)}, want: ErrMessageTooBig},
		{name: "message limit single frame", maxMessage: 100, frames: []ws.Header{bin(true, 101)}, want: ErrMessageTooBig},
		{name: "message limit resets per message", maxMessage: 100, frames: []ws.Header{
			text(false, 50), cont(true, 50), bin(false, 99), cont(true, 1), text(true, 100),
		}},
		{name: "frame and message limits", maxFrame: 60, maxMessage: 100, frames: []ws.Header{text(false, 60), cont(true, 40)}},
		{name: "frame and message limits over", maxFrame: 60, maxMessage: 100, frames: []ws.Header{text(false, 60), cont(true, 41)}, want: ErrMessageTooBig},
		{name: "no limits", frames: []ws.Header{bin(false, math.MaxInt64), cont(true, math.MaxInt64)}},
		// The message total must not wrap around past MaxInt64 and slip
		// under the limit.
		{name: "message limit overflow", maxMessage: math.MaxInt64 - 1, frames: []ws.Header{
			bin(false, 10), cont(true, math.MaxInt64),
		}, want: ErrMessageTooBig},
		{name: "message limit overflow many frames", maxMessage: 1 << 62, frames: []ws.Header{
			bin(false, 1<<61), cont(false, 1<<61), cont(true, math.MaxInt64),
		}, want: ErrMessageTooBig},
		{name: "negative length", frames: []ws.Header{bin(true, -1)}, want: ErrLengthMSB},

		// permessage-deflate.
		{name: "deflate rsv1 on single frame", ext: Deflate, frames: []ws.Header{hdr(ws.OpText, true, rsv1, 5)}},
		{name: "deflate rsv1 on first fragment", ext: Deflate, frames: []ws.Header{
			hdr(ws.OpBinary, false, rsv1, 5), ping(0), cont(false, 5), cont(true, 5),
		}},
		{name: "deflate uncompressed message", ext: Deflate, frames: []ws.Header{text(false, 1), cont(true, 1)}},
		{name: "deflate rsv1 on continuation", ext: Deflate, frames: []ws.Header{
			hdr(ws.OpText, false, rsv1, 5), hdr(ws.OpContinuation, true, rsv1, 5),
		}, want: ErrReservedBits},
		{name: "deflate rsv1 on continuation of plain message", ext: Deflate, frames: []ws.Header{
			text(false, 5), hdr(ws.OpContinuation, true, rsv1, 5),
		}, want: ErrReservedBits},
		{name: "deflate rsv1 on ping", ext: Deflate, frames: []ws.Header{hdr(ws.OpPing, true, rsv1, 0)}, want: ErrReservedBits},
		{name: "deflate rsv1 on close", ext: Deflate, frames: []ws.Header{hdr(ws.OpClose, true, rsv1, 2)}, want: ErrReservedBits},
		{name: "deflate rsv1 on pong inside message", ext: Deflate, frames: []ws.Header{
			hdr(ws.OpText, false, rsv1, 1), hdr(ws.OpPong, true, rsv1, 0),
		}, want: ErrReservedBits},
		{name: "deflate rsv2", ext: Deflate, frames: []ws.Header{hdr(ws.OpText, true, rsv2, 1)}, want: ErrReservedBits},
		{name: "deflate rsv3", ext: Deflate, frames: []ws.Header{hdr(ws.OpBinary, true, rsv3, 1)}, want: ErrReservedBits},
		{name: "deflate rsv1 and rsv2", ext: Deflate, frames: []ws.Header{hdr(ws.OpText, true, rsv1|rsv2, 1)}, want: ErrReservedBits},
		{name: "deflate rsv2 on continuation", ext: Deflate, frames: []ws.Header{text(false, 1), hdr(ws.OpContinuation, true, rsv2, 1)}, want: ErrReservedBits},
		{name: "deflate limits", ext: Deflate, maxFrame: 10, frames: []ws.Header{hdr(ws.OpText, true, rsv1, 11)}, want: ErrFrameTooBig},

		// Unknown extension: every bit on every frame is let through.
		{name: "unknown extension all bits", ext: UnknownExtension, frames: []ws.Header{
			hdr(ws.OpText, false, 0x7, 1), hdr(ws.OpPing, true, 0x7, 0), hdr(ws.OpContinuation, false, rsv2, 1),
			hdr(ws.OpClose, true, rsv3, 2), hdr(ws.OpContinuation, true, rsv1, 1),
		}},
		{name: "unknown extension still checks sequence", ext: UnknownExtension, frames: []ws.Header{hdr(ws.OpContinuation, true, rsv1, 1)}, want: ErrNoMessageToContinue},
		{name: "unknown extension still checks control length", ext: UnknownExtension, frames: []ws.Header{hdr(ws.OpPing, true, rsv1, 126)}, want: ErrControlTooLong},
	}
	// RSV bits without an extension, on data, continuation and control frames.
	for _, rsv := range []byte{rsv1, rsv2, rsv3, rsv1 | rsv2 | rsv3} {
		cs = append(cs,
			checkCase{name: "no extension rsv on text", frames: []ws.Header{hdr(ws.OpText, true, rsv, 1)}, want: ErrReservedBits},
			checkCase{name: "no extension rsv on continuation", frames: []ws.Header{text(false, 1), hdr(ws.OpContinuation, true, rsv, 1)}, want: ErrReservedBits},
			checkCase{name: "no extension rsv on ping", frames: []ws.Header{hdr(ws.OpPing, true, rsv, 1)}, want: ErrReservedBits},
		)
	}
	// Reserved opcodes, alone and between fragments.
	for op := ws.OpCode(3); op <= 15; op++ {
		if op >= 8 && op <= 10 {
			continue
		}
		cs = append(cs,
			checkCase{name: "reserved opcode", frames: []ws.Header{hdr(op, true, 0, 0)}, want: ErrReservedOpcode},
			checkCase{name: "reserved opcode inside message", ext: UnknownExtension, frames: []ws.Header{text(false, 1), hdr(op, true, 0, 0)}, want: ErrReservedOpcode},
		)
	}
	return cs
}()

// wantCodes is the close code each violation must carry.
var wantCodes = map[*Error]ws.StatusCode{
	ErrReservedOpcode:       1002,
	ErrControlTooLong:       1002,
	ErrControlFragmented:    1002,
	ErrReservedBits:         1002,
	ErrUnmasked:             1002,
	ErrMasked:               1002,
	ErrContinuationExpected: 1002,
	ErrNoMessageToContinue:  1002,
	ErrLengthMSB:            1002,
	ErrFrameTooBig:          1009,
	ErrMessageTooBig:        1009,
	ErrCloseTooShort:        1002,
	ErrCloseCode:            1002,
	ErrCloseReasonUTF8:      1007,
}

func TestErrorCodes(t *testing.T) {
	for e, code := range wantCodes {
		if e.Code != code {
			t.Errorf("%v: code %d, want %d", e, e.Code, code)
		}
		if len(e.Reason) > ws.MaxControlFramePayloadSize-2 {
			t.Errorf("%v: reason of %d bytes does not fit a close frame", e, len(e.Reason))
		}
		var err error = e
		var got *Error
		if !errors.As(err, &got) || got != e {
			t.Errorf("%v: errors.As failed", e)
		}
	}
}

func directionName(fromClient bool) string {
	if fromClient {
		return "from client"
	}
	return "from server"
}

func TestChecker(t *testing.T) {
	for _, fromClient := range []bool{true, false} {
		t.Run(directionName(fromClient), func(t *testing.T) {
			for _, tc := range checkCases {
				t.Run(tc.name, func(t *testing.T) {
					c := &Checker{FromClient: fromClient, Extension: tc.ext, MaxFrame: tc.maxFrame, MaxMessage: tc.maxMessage}
					for i, h := range tc.frames {
						h.Masked = fromClient
						if fromClient {
							h.Mask = [4]byte{1, 2, 3, 4}
						}
						err := c.Check(h)
						if i < len(tc.frames)-1 {
							if err != nil {
								t.Fatalf("frame %d %+v: %v", i, h, err)
							}
							continue
						}
						if tc.want == nil {
							if err != nil {
								t.Fatalf("frame %d %+v: %v", i, h, err)
							}
							continue
						}
						var fe *Error
						if !errors.As(err, &fe) {
							t.Fatalf("frame %d %+v: got %v, want %v", i, h, err, tc.want)
						}
						if fe != tc.want {
							t.Fatalf("frame %d %+v: got %v, want %v", i, h, err, tc.want)
						}
						if want, ok := wantCodes[tc.want]; !ok || fe.Code != want {
							t.Fatalf("frame %d: code %d, want %d", i, fe.Code, want)
						}
					}
				})
			}
		})
	}
}

func TestCheckerMasking(t *testing.T) {
	for _, fromClient := range []bool{true, false} {
		for _, h := range []ws.Header{text(true, 1), cont(true, 1), ping(0), closeh(2)} {
			c := &Checker{FromClient: fromClient}
			if h.OpCode == ws.OpContinuation {
				// Start a message so that only masking is wrong.
				start := text(false, 1)
				start.Masked = fromClient
				if err := c.Check(start); err != nil {
					t.Fatal(err)
				}
			}
			h.Masked = !fromClient
			want := ErrUnmasked
			if !fromClient {
				want = ErrMasked
			}
			if err := c.Check(h); err != want {
				t.Errorf("%s, %v masked=%v: got %v, want %v", directionName(fromClient), h.OpCode, h.Masked, err, want)
			}
			if want.Code != ws.StatusProtocolError {
				t.Errorf("code %d", want.Code)
			}
		}
	}
}

func TestCheckerInMessage(t *testing.T) {
	c := &Checker{FromClient: true}
	steps := []struct {
		h    ws.Header
		want bool
	}{
		{text(false, 1), true},
		{ping(0), true},
		{cont(false, 1), true},
		{cont(true, 1), false},
		{bin(true, 1), false},
		{bin(false, 0), true},
		{closeh(0), true},
		{cont(true, 0), false},
	}
	for i, s := range steps {
		s.h.Masked = true
		if err := c.Check(s.h); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		if c.InMessage() != s.want {
			t.Fatalf("step %d: InMessage %v, want %v", i, c.InMessage(), s.want)
		}
	}
}

// TestCheckerAgreesWithGobwas compares the verdicts with ws.CheckHeader, which
// implements the same RFC rules minus sizes and the deflate bit placement.
func TestCheckerAgreesWithGobwas(t *testing.T) {
	ops := []ws.OpCode{ws.OpContinuation, ws.OpText, ws.OpBinary, 3, 7, ws.OpClose, ws.OpPing, ws.OpPong, 11, 15}
	for _, fromClient := range []bool{true, false} {
		state := ws.StateServerSide
		if !fromClient {
			state = ws.StateClientSide
		}
		for _, inMessage := range []bool{false, true} {
			for _, op := range ops {
				for rsv := byte(0); rsv < 8; rsv++ {
					for _, fin := range []bool{false, true} {
						for _, masked := range []bool{false, true} {
							for _, length := range []int64{0, 125, 126} {
								c := &Checker{FromClient: fromClient}
								s := state
								if inMessage {
									if err := c.Check(ws.Header{OpCode: ws.OpText, Masked: fromClient}); err != nil {
										t.Fatal(err)
									}
									s |= ws.StateFragmented
								}
								h := ws.Header{Fin: fin, Rsv: rsv, OpCode: op, Masked: masked, Length: length}
								got := c.Check(h) == nil
								want := ws.CheckHeader(h, s) == nil
								if got != want {
									t.Errorf("%s inMessage=%v %+v: ours ok=%v, gobwas ok=%v (%v)",
										directionName(fromClient), inMessage, h, got, want, c.Check(h))
								}
							}
						}
					}
				}
			}
		}
	}
}
