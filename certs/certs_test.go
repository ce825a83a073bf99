package certs

import (
	"context"
	"crypto/tls"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.uber.org/goleak"

	"github.com/sluice-proxy/sluice/certs/certstest"
	"github.com/sluice-proxy/sluice/internal/wstest"
)

// handshakeListener serves TLS handshakes with r's configuration on
// loopback until the test ends, and returns its address.
func handshakeListener(t *testing.T, r *Reloader) string {
	t.Helper()
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := tls.NewListener(raw, r.ServerConfig())
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			c.(*tls.Conn).Handshake()
			c.Close()
		}
	})
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return ln.Addr().String()
}

// TestCertReload: Reload (what SIGHUP calls) makes new handshakes present
// the replaced certificate; a failed reload keeps the current one; each
// logs one line.
func TestCertReload(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) }) // after handshakeListener's cleanup
	pki := certstest.New(t)
	certFile, keyFile := pki.WritePair(t, "server", 1)
	var logs wstest.LogBuffer
	r, err := NewReloader(certFile, keyFile, zerolog.New(&logs))
	if err != nil {
		t.Fatal(err)
	}
	addr := handshakeListener(t, r)
	if got := pki.PeerSerial(t, addr); got != 1 {
		t.Fatalf("serial %d, want 1", got)
	}

	pki.WritePair(t, "server", 2)
	if got := pki.PeerSerial(t, addr); got != 1 {
		t.Errorf("serial %d before the reload, want 1", got)
	}
	if err := r.Reload("test"); err != nil {
		t.Fatal(err)
	}
	if got := pki.PeerSerial(t, addr); got != 2 {
		t.Errorf("serial %d after the reload, want 2", got)
	}

	// A key that does not match the certificate: the reload fails and
	// serial 2 stays.
	_, otherKey := pki.Issue(t, 3)
	if err := os.WriteFile(keyFile, otherKey, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.Reload("test"); err == nil {
		t.Error("reload of a mismatched pair succeeded")
	}
	if got := pki.PeerSerial(t, addr); got != 2 {
		t.Errorf("serial %d after a failed reload, want 2", got)
	}
	lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], `"level":"info"`) || !strings.Contains(lines[0], `"serial":"2"`) ||
		!strings.Contains(lines[1], `"level":"error"`) || !strings.Contains(lines[1], "private key does not match") {
		t.Errorf("want one info line for serial 2 and one error line, got:\n%s", logs.String())
	}
}

// TestCertWatch: the watcher reloads on a signal and, polling, when the
// files change.
func TestCertWatch(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) }) // after handshakeListener's cleanup
	pki := certstest.New(t)
	certFile, keyFile := pki.WritePair(t, "server", 1)
	r, err := NewReloader(certFile, keyFile, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	addr := handshakeListener(t, r)
	waitSerial := func(want int64) {
		t.Helper()
		got := int64(0)
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if got = pki.PeerSerial(t, addr); got == want {
				return
			}
		}
		t.Fatalf("serial %d, want %d", got, want)
	}
	watch := func(interval time.Duration, hup <-chan os.Signal) (stop func()) {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); r.watch(ctx, interval, hup) }()
		return func() { cancel(); <-done }
	}

	// A signal, with no poll in the test's lifetime.
	hup := make(chan os.Signal, 1)
	stop := watch(time.Hour, hup)
	pki.WritePair(t, "server", 2)
	hup <- syscall.SIGHUP
	waitSerial(2)
	stop()

	// The poll, with no signal.
	stop = watch(10*time.Millisecond, nil)
	defer stop()
	pki.WritePair(t, "server", 3)
	waitSerial(3)
}

// TestMain fails the run if a watcher goroutine outlives the tests.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
