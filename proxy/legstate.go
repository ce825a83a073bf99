package proxy

// A leg's ending, as named states: how far sluice's close toward the leg
// has gone (closeOut), what the leg's peer has said (closeIn), how far its
// reader is (readState) and its socket (sockState). Each moves only by the
// events below, through one table (legSteps); close.go and endings.go
// decide which event happens, from the session's cause (endings.go).
// All of it is guarded by s.mu.

// closeOut is how far the close frame toward a leg has gone.
type closeOut uint8

const (
	outNone    closeOut = iota // no close queued toward the leg
	outQueued                  // queued (or moved ahead of the data)
	outWritten                 // on the wire
)

// closeIn is what the leg's peer has said of the end.
type closeIn uint8

const (
	inAwaited    closeIn = iota // its close frame is awaited
	inNotAwaited                // it broke the protocol or does not read: its close is not awaited
	inReceived                  // it sent its close frame
)

// readState is how far the leg's reader is.
type readState uint8

const (
	reading      readState = iota // frames are read and forwarded
	readDraining                  // read only to find the socket's end (close.go drain)
	readDone                      // no reader will read the socket again
)

// sockState is how far the leg's socket is in its ending.
type sockState uint8

const (
	sockOpen        sockState = iota
	sockDoomed                // to be closed when s.mu is let go (unlock)
	sockDoomedReset           // ... with a reset (SO_LINGER 0)
	sockClosed                // closed
)

// legEvent is what happens to a leg as its session ends.
type legEvent uint8

const (
	evCloseQueued   legEvent = iota // sluice queued its close toward the leg
	evCloseWritten                  // ... and wrote it
	evCloseReceived                 // the peer's close frame arrived
	evNoReply                       // the peer's close is not to be awaited
	evDrain                         // the reader forwards nothing more, reads to the end
	evReaderEnded                   // no reader will read the socket again
	evDoom                          // close the socket at unlock
	evDoomReset                     // ... with a reset
	evSocketClosed                  // unlock closed it
	numLegEvents
)

// legState is a leg's ending: one state per part.
type legState struct {
	out  closeOut
	in   closeIn
	read readState
	sock sockState
}

// legStep is one row of legSteps: the part an event moves and, per state
// of that part, the next. A state an event does not move maps to itself.
type legStep struct {
	out  [3]closeOut
	in   [3]closeIn
	read [3]readState
	sock [4]sockState
}

// same is the row of an event that moves nothing in a part.
var (
	sameOut  = [3]closeOut{outNone, outQueued, outWritten}
	sameIn   = [3]closeIn{inAwaited, inNotAwaited, inReceived}
	sameRead = [3]readState{reading, readDraining, readDone}
	sameSock = [4]sockState{sockOpen, sockDoomed, sockDoomedReset, sockClosed}
)

// legSteps is every transition of a leg's ending.
var legSteps = [numLegEvents]legStep{
	evCloseQueued:  {out: [3]closeOut{outQueued, outQueued, outWritten}, in: sameIn, read: sameRead, sock: sameSock},
	evCloseWritten: {out: [3]closeOut{outNone, outWritten, outWritten}, in: sameIn, read: sameRead, sock: sameSock},
	// A close received stands: the peer has said its last word either way.
	evCloseReceived: {out: sameOut, in: [3]closeIn{inReceived, inReceived, inReceived}, read: sameRead, sock: sameSock},
	evNoReply:       {out: sameOut, in: [3]closeIn{inNotAwaited, inNotAwaited, inReceived}, read: sameRead, sock: sameSock},
	evDrain:         {out: sameOut, in: sameIn, read: [3]readState{readDraining, readDraining, readDone}, sock: sameSock},
	evReaderEnded:   {out: sameOut, in: sameIn, read: [3]readState{readDone, readDone, readDone}, sock: sameSock},
	evDoom:          {out: sameOut, in: sameIn, read: sameRead, sock: [4]sockState{sockDoomed, sockDoomed, sockDoomedReset, sockClosed}},
	evDoomReset:     {out: sameOut, in: sameIn, read: sameRead, sock: [4]sockState{sockDoomedReset, sockDoomedReset, sockDoomedReset, sockClosed}},
	// Only a doomed socket is closed (unlock).
	evSocketClosed: {out: sameOut, in: sameIn, read: sameRead, sock: [4]sockState{sockOpen, sockClosed, sockClosed, sockClosed}},
}

// step moves the leg's ending by ev. Callers hold s.mu.
func (st *legState) step(ev legEvent) {
	t := &legSteps[ev]
	st.out, st.in, st.read, st.sock = t.out[st.out], t.in[st.in], t.read[st.read], t.sock[st.sock]
}

// closeHandshakeDone: sluice's close is written and the peer's arrived.
func (st legState) closeHandshakeDone() bool { return st.out == outWritten && st.in == inReceived }
