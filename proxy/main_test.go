package proxy

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if any goroutine outlives the tests: every
// session's readers and writers, every idle poller and every timer
// callback must have ended by then.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
