// Package certs loads the PEM certificates sluice serves and presents, and
// keeps the listener's pair current: it reloads the pair on SIGHUP and when
// its files change, so certificates rotate without a restart.
package certs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// PollInterval is how often the watcher compares the certificate
// files' mtime and size with those it last loaded.
const PollInterval = 10 * time.Second

// Listen wraps ln so that it serves TLS (wss://) with the certificate
// pair in certFile and keyFile, and starts the watcher
// that reloads it on SIGHUP or when a file changes until ctx ends. The
// caller must call stop once it no longer serves: it ends the watcher if
// ctx has not, waits for it, and lets SIGHUP take its default action
// again. On error ln is closed.
func Listen(ctx context.Context, ln net.Listener, certFile, keyFile string, log zerolog.Logger) (_ net.Listener, stop func(), _ error) {
	certs, err := NewReloader(certFile, keyFile, log)
	if err != nil {
		ln.Close()
		return nil, nil, err
	}
	// Installed before serve reports ready, so that an early SIGHUP
	// reloads rather than kills. The handler stays until stop, past the
	// watcher, so a SIGHUP during the drain does not kill sluice either.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		certs.watch(ctx, PollInterval, hup)
	}()
	return tls.NewListener(ln, certs.ServerConfig()), func() {
		cancel()
		<-done
		signal.Stop(hup)
	}, nil
}

// fileStamp is what the watcher compares to notice a changed file.
type fileStamp struct {
	modTime time.Time
	size    int64
	missing bool
}

func stampOf(path string) fileStamp {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{missing: true}
	}
	return fileStamp{modTime: fi.ModTime(), size: fi.Size()}
}

// Reloader holds the listener's certificate and replaces it when its
// files change, so certificates rotate without a restart. Handshakes read
// the current one without locking.
type Reloader struct {
	certFile, keyFile string
	log               zerolog.Logger

	cert atomic.Pointer[tls.Certificate] // never nil after NewReloader

	mu     sync.Mutex   // serialises reloads
	stamps [2]fileStamp // of certFile and keyFile at the last reload attempt, guarded by mu
}

// NewReloader loads the pair once. The error is the loader's; the caller
// names the settings the files came from.
func NewReloader(certFile, keyFile string, log zerolog.Logger) (*Reloader, error) {
	r := &Reloader{certFile: certFile, keyFile: keyFile, log: log}
	if err := r.load(); err != nil {
		return nil, err
	}
	return r, nil
}

// ServerConfig is the listener's TLS configuration: the current
// certificate at each handshake, TLS 1.2 or later, HTTP/1.1 only (a
// WebSocket upgrade is an HTTP/1.1 request).
func (r *Reloader) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: r.getCertificate,
		NextProtos:     []string{"http/1.1"},
	}
}

func (r *Reloader) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return r.cert.Load(), nil
}

// load reads the pair and, if it is valid, makes it current. The stamps
// are taken before reading, so a file that changes meanwhile is read
// again at the next poll; they are kept even when loading fails, so a
// broken pair is reported once, not at every poll. The caller must not
// hold mu.
func (r *Reloader) load() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stamps = [2]fileStamp{stampOf(r.certFile), stampOf(r.keyFile)}
	c, err := LoadKeyPair(r.certFile, r.keyFile)
	if err != nil {
		return err
	}
	r.cert.Store(&c)
	return nil
}

// changed reports whether either file differs from the last reload
// attempt.
func (r *Reloader) changed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stamps != [2]fileStamp{stampOf(r.certFile), stampOf(r.keyFile)}
}

// Reload reloads the pair now (SIGHUP does this). On failure the old
// certificate stays; either way it logs one line, naming trigger.
func (r *Reloader) Reload(trigger string) error {
	err := r.load()
	if err != nil {
		r.log.Error().Err(err).Str("trigger", trigger).Str("cert_file", r.certFile).Str("key_file", r.keyFile).
			Msg("tls certificate reload failed; keeping the current certificate")
		return err
	}
	leaf := r.cert.Load().Leaf
	r.log.Info().Str("trigger", trigger).Str("cert_file", r.certFile).
		Str("serial", leaf.SerialNumber.Text(16)).Time("not_after", leaf.NotAfter).
		Msg("tls certificate reloaded")
	return nil
}

// watch is the certificate watcher goroutine: it reloads on every value
// from hup and when a poll every interval finds a file changed, until ctx
// ends. A nil hup is never ready.
func (r *Reloader) watch(ctx context.Context, interval time.Duration, hup <-chan os.Signal) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			r.Reload("sighup")
		case <-t.C:
			if r.changed() {
				r.Reload("file_change")
			}
		}
	}
}

// LoadKeyPair loads a PEM certificate chain and its key, with Leaf set, so
// that a reload can log the serial and expiry without parsing again.
func LoadKeyPair(certFile, keyFile string) (tls.Certificate, error) {
	c, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return tls.Certificate{}, err
	}
	if c.Leaf == nil {
		if c.Leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
			return tls.Certificate{}, err
		}
	}
	return c, nil
}

// LoadCAPool returns a pool holding only the certificates of a PEM file.
func LoadCAPool(file string) (*x509.CertPool, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, errors.New("no PEM certificate found")
	}
	return pool, nil
}
