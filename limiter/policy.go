package limiter

import (
	"errors"
	"fmt"
)

// Policy is what a Queue does when a new message arrives above its
// high-water mark.
type Policy uint8

const (
	// Evict refuses the message and tells the producer to close the
	// connection (the client gets 1013 Try Again Later).
	Evict Policy = iota
	// Drop discards the oldest whole messages so that the newest ones fit.
	Drop
	// Pause blocks the producer until the queue falls below its low-water
	// mark, so TCP backpressure reaches the sender.
	Pause
)

var policyNames = [...]string{Evict: "evict", Drop: "drop", Pause: "pause"}

func (p Policy) String() string {
	if int(p) < len(policyNames) {
		return policyNames[p]
	}
	return fmt.Sprintf("Policy(%d)", uint8(p))
}

// ParsePolicy reads a policy name: evict, drop or pause.
func ParsePolicy(s string) (Policy, error) {
	for p, name := range policyNames {
		if s == name {
			return Policy(p), nil
		}
	}
	return 0, fmt.Errorf("limiter: unknown policy %q (want evict, drop or pause)", s)
}

// Errors that Push returns.
var (
	// ErrOverflow: the queue is past its high-water mark under the Evict
	// policy; the connection must be closed.
	ErrOverflow = errors.New("limiter: queue over its high-water mark")
	// ErrPauseTimeout: a pause lasted longer than Config.PauseMax.
	ErrPauseTimeout = errors.New("limiter: paused too long")
	// ErrClosed: the queue was closed; nothing more will be written.
	ErrClosed = errors.New("limiter: queue closed")
	// ErrIdle: Take found nothing to write; the writer should end.
	ErrIdle = errors.New("limiter: nothing to write")
)
