package demo

import (
	"context"
	"fmt"
	"net"
	"syscall"

	"sluice/internal/naive"
)

// startBackend starts the naive broadcast backend (the failure sluice
// exists to prevent: a queue per client without bound) on a loopback
// listener whose sockets behave more like a real network path. Nothing is
// sent until d.backend.Start.
func (d *demo) startBackend() error {
	b, err := naive.New(naive.Config{Size: d.opts.size, Rate: float64(d.opts.rate)})
	if err != nil {
		return fmt.Errorf("demo: backend: %w", err)
	}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		// Accepted sockets inherit both options.
		return setSockopts(c, sockopt{syscall.SOL_SOCKET, syscall.SO_SNDBUF, backendSendBuf},
			sockopt{syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, ethernetMSS})
	}}
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("demo: backend: %w", err)
	}
	d.backend, d.backendLn = b, ln
	go b.Serve(ln) // Close waits for it
	return nil
}

// closeBackend stops the backend and waits for all its goroutines.
// Idempotent.
func (d *demo) closeBackend() {
	d.backendLn.Close()
	d.backend.Close()
}
