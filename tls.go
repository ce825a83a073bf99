package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// certPollInterval is how often the watcher compares the certificate
// files' mtime and size with those it last loaded.
const certPollInterval = 10 * time.Second

// listenTLS wraps ln so that it serves TLS (wss://) with the certificate
// of SLUICE_TLS_CERT_FILE and SLUICE_TLS_KEY_FILE, and starts the watcher
// that reloads it on SIGHUP or when a file changes until ctx ends. The
// caller must call stop once it no longer serves: it ends the watcher if
// ctx has not, waits for it, and lets SIGHUP take its default action
// again. On error ln is closed.
func listenTLS(ctx context.Context, ln net.Listener, cfg Config, log zerolog.Logger) (_ net.Listener, stop func(), _ error) {
	certs, err := newCertReloader(cfg.TLSCertFile, cfg.TLSKeyFile, log)
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
		certs.watch(ctx, certPollInterval, hup)
	}()
	return tls.NewListener(ln, certs.serverConfig()), func() {
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

// certReloader holds the listener's certificate and replaces it when its
// files change, so certificates rotate without a restart. Handshakes read
// the current one without locking.
type certReloader struct {
	certFile, keyFile string
	log               zerolog.Logger

	cert atomic.Pointer[tls.Certificate] // never nil after newCertReloader

	mu     sync.Mutex   // serialises reloads
	stamps [2]fileStamp // of certFile and keyFile at the last reload attempt, guarded by mu
}

// newCertReloader loads the pair once; an error names both variables.
func newCertReloader(certFile, keyFile string, log zerolog.Logger) (*certReloader, error) {
	r := &certReloader{certFile: certFile, keyFile: keyFile, log: log}
	if err := r.load(); err != nil {
		return nil, fmt.Errorf("%s=%q, %s=%q: %w", envPrefix+"TLS_CERT_FILE", certFile, envPrefix+"TLS_KEY_FILE", keyFile, err)
	}
	return r, nil
}

// serverConfig is the listener's TLS configuration: the current
// certificate at each handshake, TLS 1.2 or later, HTTP/1.1 only (a
// WebSocket upgrade is an HTTP/1.1 request).
func (r *certReloader) serverConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: r.getCertificate,
		NextProtos:     []string{"http/1.1"},
	}
}

func (r *certReloader) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return r.cert.Load(), nil
}

// load reads the pair and, if it is valid, makes it current. The stamps
// are taken before reading, so a file that changes meanwhile is read
// again at the next poll; they are kept even when loading fails, so a
// broken pair is reported once, not at every poll. The caller must not
// hold mu.
func (r *certReloader) load() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stamps = [2]fileStamp{stampOf(r.certFile), stampOf(r.keyFile)}
	c, err := loadKeyPair(r.certFile, r.keyFile)
	if err != nil {
		return err
	}
	r.cert.Store(&c)
	return nil
}

// changed reports whether either file differs from the last reload
// attempt.
func (r *certReloader) changed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stamps != [2]fileStamp{stampOf(r.certFile), stampOf(r.keyFile)}
}

// Reload reloads the pair now (SIGHUP does this). On failure the old
// certificate stays; either way it logs one line, naming trigger.
func (r *certReloader) Reload(trigger string) error {
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
func (r *certReloader) watch(ctx context.Context, interval time.Duration, hup <-chan os.Signal) {
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

// loadKeyPair loads a PEM certificate chain and its key, with Leaf set.
func loadKeyPair(certFile, keyFile string) (tls.Certificate, error) {
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

// loadCAPool returns a pool holding only the certificates of a PEM file.
func loadCAPool(file string) (*x509.CertPool, error) {
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

// upstreamTLSConfig is the TLS configuration for a wss:// upstream, or nil
// for the defaults (system roots, no client certificate) and for ws://.
// With SLUICE_UPSTREAM_CA_FILE, only its CAs are trusted. Errors name the
// variable.
func upstreamTLSConfig(cfg Config) (*tls.Config, error) {
	if cfg.UpstreamURL == nil || cfg.UpstreamURL.Scheme != "wss" ||
		(cfg.UpstreamCAFile == "" && cfg.UpstreamClientCertFile == "") {
		return nil, nil
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.UpstreamCAFile != "" {
		pool, err := loadCAPool(cfg.UpstreamCAFile)
		if err != nil {
			return nil, fmt.Errorf("%sUPSTREAM_CA_FILE=%q: %w", envPrefix, cfg.UpstreamCAFile, err)
		}
		tc.RootCAs = pool
	}
	if cfg.UpstreamClientCertFile != "" {
		c, err := loadKeyPair(cfg.UpstreamClientCertFile, cfg.UpstreamClientKeyFile)
		if err != nil {
			return nil, fmt.Errorf("%sUPSTREAM_CLIENT_CERT_FILE=%q, %sUPSTREAM_CLIENT_KEY_FILE=%q: %w",
				envPrefix, cfg.UpstreamClientCertFile, envPrefix, cfg.UpstreamClientKeyFile, err)
		}
		tc.Certificates = []tls.Certificate{c}
	}
	return tc, nil
}

// checkTLS is check's part for the TLS variables: pairs set together, the
// upstream ones only with wss://, and every file loading. It reads the
// files, so that LoadConfig reports a bad one with every other problem.
func (cfg Config) checkTLS(c *checker) {
	if c.pair("TLSCertFile", cfg.TLSCertFile, "TLSKeyFile", cfg.TLSKeyFile) && cfg.TLSCertFile != "" {
		if _, err := loadKeyPair(cfg.TLSCertFile, cfg.TLSKeyFile); err != nil {
			c.fileProblem(err, "TLSCertFile", cfg.TLSCertFile, "TLSKeyFile", cfg.TLSKeyFile)
		}
	}

	clientPair := c.pair("UpstreamClientCertFile", cfg.UpstreamClientCertFile, "UpstreamClientKeyFile", cfg.UpstreamClientKeyFile)
	upstream := []struct{ name, value string }{
		{"UpstreamCAFile", cfg.UpstreamCAFile},
		{"UpstreamClientCertFile", cfg.UpstreamClientCertFile},
		{"UpstreamClientKeyFile", cfg.UpstreamClientKeyFile},
	}
	if u := cfg.UpstreamURL; u != nil && u.Scheme != "wss" {
		for _, f := range upstream {
			if f.value != "" {
				c.cross(false, f.name, f.value, "UpstreamURL", u, "applies only to a wss:// upstream, not %s")
				c.bad[f.name] = true
			}
		}
	}
	if cfg.UpstreamCAFile != "" && !c.anyBad("UpstreamCAFile") {
		if _, err := loadCAPool(cfg.UpstreamCAFile); err != nil {
			c.fileProblem(err, "UpstreamCAFile", cfg.UpstreamCAFile)
		}
	}
	if clientPair && cfg.UpstreamClientCertFile != "" && !c.anyBad("UpstreamClientCertFile", "UpstreamClientKeyFile") {
		if _, err := loadKeyPair(cfg.UpstreamClientCertFile, cfg.UpstreamClientKeyFile); err != nil {
			c.fileProblem(err, "UpstreamClientCertFile", cfg.UpstreamClientCertFile, "UpstreamClientKeyFile", cfg.UpstreamClientKeyFile)
		}
	}
}

// pair reports a and b as bad when only one of them is set, and returns
// whether they are fine: both set or both empty.
func (c *checker) pair(a, aValue, b, bValue string) bool {
	if c.anyBad(a, b) {
		return false
	}
	if (aValue == "") == (bValue == "") {
		return true
	}
	set, missing, value := a, b, aValue
	if aValue == "" {
		set, missing, value = b, a, bValue
	}
	f := fieldsByName[set]
	c.add(Problem{Var: f.key, Value: value, Msg: "set " + fieldsByName[missing].key + " too; they go together", order: f.index})
	c.bad[a], c.bad[b] = true, true
	return false
}

// fileProblem reports that the files of the fields named in nameValues
// (name, value, name, value...) do not load, quoting err.
func (c *checker) fileProblem(err error, nameValues ...string) {
	var keys, values string
	for i := 0; i+1 < len(nameValues); i += 2 {
		if i > 0 {
			keys, values = keys+"+", values+"+"
		}
		keys += fieldsByName[nameValues[i]].key
		values += nameValues[i+1]
		c.bad[nameValues[i]] = true
	}
	c.add(Problem{Var: keys, Value: values, Msg: "cannot load: " + err.Error(), order: fieldsByName[nameValues[0]].index})
}
