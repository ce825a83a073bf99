package frontdoor

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if any goroutine outlives the tests: a pacer's
// waiters and timer, the request readers' pipes.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
