package frame

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if a test leaves a goroutine behind, such as a
// writer blocked on a connection nobody reads.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
