//go:build !linux

package proxy

import "net"

// unsentCounter is Linux-only (SIOCOUTQ); elsewhere the kernel's share is
// not counted.
func unsentCounter(net.Conn) func() int64 { return nil }
