package frame

import "github.com/gobwas/ws"

// Extension says which RSV bits a negotiated extension gives meaning to.
type Extension uint8

const (
	// NoExtension: every RSV bit must be zero.
	NoExtension Extension = iota
	// Deflate is permessage-deflate (RFC 7692): RSV1 on the first frame of a
	// data message, nowhere else.
	Deflate
	// UnknownExtension: an extension sluice does not know was negotiated, so
	// it cannot tell which bits are legal and lets all of them through.
	UnknownExtension
)

// Checker validates the frames of one direction of one connection, in order.
// It tracks fragmentation and message size; it is owned by the goroutine that
// reads that direction.
type Checker struct {
	// FromClient: frames must be masked (true) or must not be (false).
	FromClient bool
	Extension  Extension
	inMessage  bool // next to the small fields: a Checker is 32 bytes, not 40
	// MaxFrame and MaxMessage bound the payload of one frame and of one
	// message across its fragments; 0 means no bound.
	MaxFrame   int64
	MaxMessage int64

	messageBytes int64
}

// Check validates h, the next frame header of the direction, and advances the
// state. It returns one of this package's *Error values.
func (c *Checker) Check(h ws.Header) error {
	op := h.OpCode
	if op.IsReserved() {
		return ErrReservedOpcode
	}
	if c.FromClient != h.Masked {
		if c.FromClient {
			return ErrUnmasked
		}
		return ErrMasked
	}
	if h.Length < 0 {
		return ErrLengthMSB
	}
	if op.IsControl() {
		if h.Length > ws.MaxControlFramePayloadSize {
			return ErrControlTooLong
		}
		if !h.Fin {
			return ErrControlFragmented
		}
		if h.Rsv != 0 && c.Extension != UnknownExtension {
			return ErrReservedBits
		}
		return nil
	}
	if op == ws.OpContinuation {
		if !c.inMessage {
			return ErrNoMessageToContinue
		}
	} else if c.inMessage {
		return ErrContinuationExpected
	}
	switch c.Extension {
	case NoExtension:
		if h.Rsv != 0 {
			return ErrReservedBits
		}
	case Deflate:
		// RSV1 marks a compressed message and belongs on its first frame only.
		if h.Rsv&^0x4 != 0 || (h.Rsv != 0 && op == ws.OpContinuation) {
			return ErrReservedBits
		}
	}
	if c.MaxFrame > 0 && h.Length > c.MaxFrame {
		return ErrFrameTooBig
	}
	if op != ws.OpContinuation {
		c.messageBytes = 0
	}
	// Compare against what is left rather than adding first: a sum of
	// peer-given lengths could wrap past MaxInt64 and slip under the bound.
	// messageBytes never exceeds MaxMessage, so the subtraction is safe.
	if c.MaxMessage > 0 && h.Length > c.MaxMessage-c.messageBytes {
		return ErrMessageTooBig
	}
	c.messageBytes += h.Length
	c.inMessage = !h.Fin
	return nil
}

// InMessage reports whether a fragmented message is under way: its first
// frame has passed Check and its final frame has not.
func (c *Checker) InMessage() bool { return c.inMessage }
