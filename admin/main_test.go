package admin

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if a status sampler or handler outlives the
// tests.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
