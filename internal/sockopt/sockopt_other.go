//go:build !linux

package sockopt

import "net"

// UnsentCounter is Linux-only (SIOCOUTQ); elsewhere the kernel's share is
// not counted.
func UnsentCounter(net.Conn) func() int64 { return nil }
