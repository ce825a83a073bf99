//go:build !linux

package proxy

// idlePoller is Linux-only (epoll); elsewhere readers of idle sockets wait
// in their goroutines.
type idlePoller struct{}

func newIdlePoller() (*idlePoller, error) { return nil, nil }

func (p *idlePoller) park(*leg) bool { return false }
func (p *idlePoller) forget(*leg)    {}
func (p *idlePoller) close()         {}
