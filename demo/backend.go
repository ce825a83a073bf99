package demo

import (
	"context"
	"fmt"
	"net"
	"syscall"

	"github.com/sluice-proxy/sluice/internal/naive"
)

// startBackend starts a fresh naive broadcast backend for p (the failure
// sluice exists to prevent: a queue per client without bound, and no limit
// on what clients send) on a loopback listener whose sockets behave more
// like a real network path. Nothing is sent until p.backend.Start.
func (d *demo) startBackend(p *phase) error {
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
	p.backend, p.backendLn = b, ln
	go b.Serve(ln) // Close waits for it
	return nil
}

// closeBackend stops p's backend and waits for all its goroutines.
// Idempotent.
func (p *phase) closeBackend() {
	if p.backend == nil {
		return
	}
	p.backendLn.Close()
	p.backend.Close()
}
