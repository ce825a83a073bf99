package frame

import (
	"fmt"

	"github.com/gobwas/ws"
)

// Error is a violation of the protocol by a peer, with the close code the
// peer must be sent. Read it with errors.As.
type Error struct {
	Code   ws.StatusCode
	Reason string // short, sent in the close frame; at most 123 bytes
}

func (e *Error) Error() string { return fmt.Sprintf("frame: %s (close %d)", e.Reason, e.Code) }

// The violations, as values so the hot path allocates nothing to report one.
var (
	ErrReservedOpcode       = &Error{ws.StatusProtocolError, "reserved opcode"}
	ErrControlTooLong       = &Error{ws.StatusProtocolError, "control frame longer than 125 bytes"}
	ErrControlFragmented    = &Error{ws.StatusProtocolError, "fragmented control frame"}
	ErrReservedBits         = &Error{ws.StatusProtocolError, "reserved bits set without an extension"}
	ErrUnmasked             = &Error{ws.StatusProtocolError, "unmasked frame from client"}
	ErrMasked               = &Error{ws.StatusProtocolError, "masked frame from server"}
	ErrContinuationExpected = &Error{ws.StatusProtocolError, "new data frame inside a fragmented message"}
	ErrNoMessageToContinue  = &Error{ws.StatusProtocolError, "continuation frame without a message"}
	ErrLengthMSB            = &Error{ws.StatusProtocolError, "64-bit length with the top bit set"}
	ErrFrameTooBig          = &Error{ws.StatusMessageTooBig, "frame too big"}
	ErrMessageTooBig        = &Error{ws.StatusMessageTooBig, "message too big"}
	ErrCloseTooShort        = &Error{ws.StatusProtocolError, "close payload of one byte"}
	ErrCloseCode            = &Error{ws.StatusProtocolError, "invalid close code"}
	ErrCloseReasonUTF8      = &Error{ws.StatusInvalidFramePayloadData, "close reason is not UTF-8"}
)
