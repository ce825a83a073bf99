//go:build !unix

package serve

// readHostLimits knows no limits outside Unix.
func readHostLimits() (hostLimits, error) { return hostLimits{}, nil }
