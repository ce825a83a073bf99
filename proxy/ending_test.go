package proxy

import "testing"

// TestLegSteps states every transition of a leg's ending once more, as the
// close code relies on it, and checks that an event moves only its part.
func TestLegSteps(t *testing.T) {
	tests := []struct {
		name string
		from legState
		ev   legEvent
		want legState
	}{
		{"queue a close", legState{}, evCloseQueued, legState{out: outQueued}},
		{"hold a close", legState{}, evCloseHeld, legState{out: outHeld}},
		{"hold again", legState{out: outHeld}, evCloseHeld, legState{out: outHeld}},
		{"a queued close is not held back", legState{out: outQueued}, evCloseHeld, legState{out: outQueued}},
		{"a written close is not held back", legState{out: outWritten}, evCloseHeld, legState{out: outWritten}},
		{"queue the held close", legState{out: outHeld}, evCloseQueued, legState{out: outQueued}},
		{"a held close is not written", legState{out: outHeld}, evCloseWritten, legState{out: outHeld}},
		{"queue a close again", legState{out: outQueued}, evCloseQueued, legState{out: outQueued}},
		{"a written close stays written", legState{out: outWritten}, evCloseQueued, legState{out: outWritten}},
		{"write the queued close", legState{out: outQueued}, evCloseWritten, legState{out: outWritten}},
		{"nothing queued, nothing written", legState{}, evCloseWritten, legState{}},
		{"write twice", legState{out: outWritten}, evCloseWritten, legState{out: outWritten}},

		{"peer closes", legState{}, evCloseReceived, legState{in: inReceived}},
		{"peer that was given up on closes after all", legState{in: inNotAwaited}, evCloseReceived, legState{in: inReceived}},
		{"stop awaiting the peer", legState{}, evNoReply, legState{in: inNotAwaited}},
		{"a close received stands", legState{in: inReceived}, evNoReply, legState{in: inReceived}},

		{"reader drains", legState{}, evDrain, legState{read: readDraining}},
		{"drain again", legState{read: readDraining}, evDrain, legState{read: readDraining}},
		{"an ended reader does not drain", legState{read: readDone}, evDrain, legState{read: readDone}},
		{"reader ends", legState{}, evReaderEnded, legState{read: readDone}},
		{"draining reader ends", legState{read: readDraining}, evReaderEnded, legState{read: readDone}},

		{"doom", legState{}, evDoom, legState{sock: sockDoomed}},
		{"doom with a reset", legState{}, evDoomReset, legState{sock: sockDoomedReset}},
		{"a reset wins over a plain close", legState{sock: sockDoomed}, evDoomReset, legState{sock: sockDoomedReset}},
		{"a plain close keeps the reset", legState{sock: sockDoomedReset}, evDoom, legState{sock: sockDoomedReset}},
		{"close the doomed", legState{sock: sockDoomed}, evSocketClosed, legState{sock: sockClosed}},
		{"close the doomed with a reset", legState{sock: sockDoomedReset}, evSocketClosed, legState{sock: sockClosed}},
		{"an open socket is not closed", legState{}, evSocketClosed, legState{}},
		{"a closed socket is closed once", legState{sock: sockClosed}, evDoomReset, legState{sock: sockClosed}},

		{"the socket fails", legState{}, evLost, legState{link: linkLost}},
		{"lost stands", legState{link: linkLost}, evLost, legState{link: linkLost}},
		{"a lost socket is doomed and closed as any", legState{link: linkLost}, evDoom, legState{link: linkLost, sock: sockDoomed}},
		{"a lost socket keeps its close state", legState{out: outQueued, in: inAwaited, read: readDraining}, evLost,
			legState{out: outQueued, read: readDraining, link: linkLost}},

		// Every part keeps its state under the events of the others.
		{"a queued close under a reset", legState{out: outQueued, in: inReceived, read: readDraining}, evDoomReset,
			legState{out: outQueued, in: inReceived, read: readDraining, sock: sockDoomedReset}},
		{"a closed socket under a close frame", legState{read: readDone, sock: sockClosed}, evCloseReceived,
			legState{in: inReceived, read: readDone, sock: sockClosed}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.from
			got.step(tt.ev)
			if got != tt.want {
				t.Errorf("%+v after event %d = %+v, want %+v", tt.from, tt.ev, got, tt.want)
			}
		})
	}
}

// TestLegFinished: a leg has finished once its close is written and its
// peer's came or is not awaited, or its socket failed.
func TestLegFinished(t *testing.T) {
	tests := []struct {
		events []legEvent
		dead   bool
		want   bool
	}{
		{nil, false, false},
		{nil, true, true},
		{[]legEvent{evCloseQueued, evCloseWritten}, false, false},
		{[]legEvent{evCloseQueued, evCloseWritten, evCloseReceived}, false, true},
		{[]legEvent{evCloseReceived, evCloseQueued, evCloseWritten}, false, true},
		{[]legEvent{evNoReply, evCloseQueued, evCloseWritten}, false, true},
		{[]legEvent{evNoReply, evCloseQueued}, false, false},
		{[]legEvent{evCloseReceived}, false, false},
	}
	for _, tt := range tests {
		l := leg{}
		if tt.dead {
			l.end.step(evLost)
		}
		for _, ev := range tt.events {
			l.end.step(ev)
		}
		if got := l.finished(); got != tt.want {
			t.Errorf("events %v, dead %v: finished %v, want %v", tt.events, tt.dead, got, tt.want)
		}
	}
}

// TestEndNoteText: the "session closed" line's reason, as operators have
// read it, from the typed note.
func TestEndNoteText(t *testing.T) {
	tests := []struct {
		n      endNote
		c      cause
		detail string
		want   string
	}{
		{noteNone, causeNone, "", ""},
		{noteClientClosed, causeNone, "", "client closed"},
		{noteUpstreamLost, causeUpstreamLost, "EOF", "upstream lost: EOF"},
		{noteClientWriteFailed, causeWriteTimeout, "i/o timeout", "client write failed: i/o timeout"},
		{noteCause, causeSlow, "", "slow"},
		{noteCause, causeClientProtocol, "invalid UTF-8", "client protocol error: invalid UTF-8"},
		{noteCloseTimeout, causeShutdown, "", "close handshake timed out"},
	}
	for _, tt := range tests {
		if got := tt.n.text(tt.c, tt.detail); got != tt.want {
			t.Errorf("note %d, cause %d, %q: %q, want %q", tt.n, tt.c, tt.detail, got, tt.want)
		}
	}
}
