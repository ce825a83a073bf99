package main

import (
	"context"
	"net"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.uber.org/goleak"

	"sluice/proxy"
)

// TestServeListenerFailure: when the WebSocket listener fails, serve
// returns its error only after closing the admin listener and ending
// every goroutine it started.
func TestServeListenerFailure(t *testing.T) {
	defer goleak.VerifyNone(t)
	cfg, err := LoadConfig(environ("SLUICE_LISTEN_ADDR", "127.0.0.1:0", "SLUICE_ADMIN_ADDR", "127.0.0.1:0",
		"SLUICE_DRAIN_DELAY", "20s", "SLUICE_SHUTDOWN_TIMEOUT", "25s"))
	if err != nil {
		t.Fatal(err)
	}
	type addrs struct{ ws, admin string }
	ready := make(chan addrs, 1)
	done := make(chan error, 1)
	go func() {
		done <- serve(context.Background(), cfg, zerolog.Nop(), func(ws, admin string, _ *proxy.Server) {
			ready <- addrs{ws, admin}
		})
	}()
	var a addrs
	select {
	case a = <-ready:
	case err := <-done:
		t.Fatalf("serve: %v", err)
	}

	// Shut the listening socket down under serve: accept then fails with
	// EINVAL, as it would for a listener broken some other way.
	shutdownListener(t, a.ws)
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("serve returned nil after its listener failed")
		}
		t.Logf("serve: %v", err)
	case <-time.After(10 * time.Second): // well short of the 20 s drain delay
		t.Fatal("serve did not return after its listener failed")
	}
	if c, err := net.DialTimeout("tcp", a.admin, time.Second); err == nil {
		c.Close()
		t.Errorf("admin listener %s still accepts after serve returned", a.admin)
	}
}

// shutdownListener finds this process's listening socket bound to addr
// and shuts it down.
func shutdownListener(t *testing.T, addr string) {
	t.Helper()
	_, portStr, _ := net.SplitHostPort(addr)
	port, _ := strconv.Atoi(portStr)
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd:", err)
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if on, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_ACCEPTCONN); err != nil || on == 0 {
			continue
		}
		if sa, err := syscall.Getsockname(fd); err == nil {
			if in4, ok := sa.(*syscall.SockaddrInet4); ok && in4.Port == port {
				if err := syscall.Shutdown(fd, syscall.SHUT_RDWR); err != nil {
					t.Fatal(err)
				}
				return
			}
		}
	}
	t.Fatalf("no listening socket for %s", addr)
}
