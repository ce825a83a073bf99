package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/rs/zerolog"
	"go.uber.org/goleak"
)

// testPKI is a throwaway CA that issues P-256 leaves for 127.0.0.1.
type testPKI struct {
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	pem    []byte
	pool   *x509.CertPool
	dir    string
	cafile string
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1000),
		Subject:               pkix.Name{CommonName: "sluice test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	p := &testPKI{cert: cert, key: key, pool: x509.NewCertPool(), dir: t.TempDir(),
		pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
	p.pool.AddCert(cert)
	p.cafile = filepath.Join(p.dir, "ca.pem")
	if err := os.WriteFile(p.cafile, p.pem, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// issue returns the PEM certificate and key of a new leaf with serial,
// for 127.0.0.1 and localhost, usable as server or client.
func (p *testPKI) issue(t *testing.T, serial int64) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: "sluice test leaf"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.cert, &key.PublicKey, p.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
}

// writePair issues a leaf with serial and writes it to name.crt and
// name.key in p.dir, each by rename, with an mtime serial seconds ahead so
// that the watcher sees a change whatever the file system's timestamp
// granularity.
func (p *testPKI) writePair(t *testing.T, name string, serial int64) (certFile, keyFile string) {
	t.Helper()
	certPEM, keyPEM := p.issue(t, serial)
	certFile, keyFile = filepath.Join(p.dir, name+".crt"), filepath.Join(p.dir, name+".key")
	mtime := time.Now().Add(time.Duration(serial) * time.Second)
	for _, f := range []struct {
		path string
		data []byte
	}{{certFile, certPEM}, {keyFile, keyPEM}} {
		if err := os.WriteFile(f.path+".tmp", f.data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(f.path+".tmp", mtime, mtime); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(f.path+".tmp", f.path); err != nil {
			t.Fatal(err)
		}
	}
	return certFile, keyFile
}

// echoHandler is a gorilla/websocket backend that echoes every message.
func echoHandler() http.Handler {
	up := websocket.Upgrader{}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer c.Close()
		for {
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			mt, msg, err := c.ReadMessage()
			if err != nil {
				return
			}
			if err := c.WriteMessage(mt, msg); err != nil {
				return
			}
		}
	})
}

// echo dials u (trusting roots for wss://), sends a message and checks it
// comes back. It returns the handshake response and error of the dial.
func echo(t *testing.T, u string, roots *x509.CertPool) (*http.Response, error) {
	t.Helper()
	d := websocket.Dialer{HandshakeTimeout: 5 * time.Second, TLSClientConfig: &tls.Config{RootCAs: roots}}
	c, resp, err := d.Dial(u, nil)
	if err != nil {
		return resp, err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := c.WriteMessage(websocket.TextMessage, []byte("hello over tls")); err != nil {
		t.Fatal(err)
	}
	if _, msg, err := c.ReadMessage(); err != nil || string(msg) != "hello over tls" {
		t.Fatalf("echo: %q, %v", msg, err)
	}
	c.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
	return resp, nil
}

// peerSerial handshakes with addr trusting roots and returns the serial
// of the certificate it presents.
func peerSerial(t *testing.T, addr string, roots *x509.CertPool) int64 {
	t.Helper()
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.(*tls.Conn).ConnectionState().PeerCertificates[0].SerialNumber.Int64()
}

// TestServeTLS: with a certificate pair, serve speaks wss:// on the
// WebSocket listener and proxies to a ws:// backend; plain ws:// is
// refused there, and the admin listener stays plain HTTP.
func TestServeTLS(t *testing.T) {
	defer goleak.VerifyNone(t)
	pki := newTestPKI(t)
	certFile, keyFile := pki.writePair(t, "server", 1)
	backend := httptest.NewServer(echoHandler())
	defer backend.Close()
	wsAddr, adminAddr, _, stop := startSluice(t, map[string]string{
		envPrefix + "UPSTREAM_URL":     "ws://" + backend.Listener.Addr().String() + "/",
		envPrefix + "TLS_CERT_FILE":    certFile,
		envPrefix + "TLS_KEY_FILE":     keyFile,
		envPrefix + "SHUTDOWN_TIMEOUT": "3s",
		envPrefix + "CLOSE_TIMEOUT":    "1s",
	})
	defer stop()

	if _, err := echo(t, "wss://"+wsAddr+"/echo", pki.pool); err != nil {
		t.Fatalf("wss:// through sluice: %v", err)
	}
	if got := peerSerial(t, wsAddr, pki.pool); got != 1 {
		t.Errorf("serial %d, want 1", got)
	}
	if _, err := echo(t, "wss://"+wsAddr+"/echo", x509.NewCertPool()); err == nil {
		t.Error("a client not trusting the CA connected")
	}
	if _, err := echo(t, "ws://"+wsAddr+"/echo", nil); err == nil {
		t.Error("plain ws:// accepted on the TLS listener")
	}

	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get("http://" + adminAddr + "/healthz")
	if err != nil {
		t.Fatalf("admin over plain HTTP: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("admin /healthz: %s", resp.Status)
	}
}

// syncBuffer is a log sink the watcher goroutine and the test share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// handshakeListener serves TLS handshakes with r's configuration on
// loopback until the test ends, and returns its address.
func handshakeListener(t *testing.T, r *certReloader) string {
	t.Helper()
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := tls.NewListener(raw, r.serverConfig())
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
	pki := newTestPKI(t)
	certFile, keyFile := pki.writePair(t, "server", 1)
	var logs syncBuffer
	r, err := newCertReloader(certFile, keyFile, zerolog.New(&logs))
	if err != nil {
		t.Fatal(err)
	}
	addr := handshakeListener(t, r)
	if got := peerSerial(t, addr, pki.pool); got != 1 {
		t.Fatalf("serial %d, want 1", got)
	}

	pki.writePair(t, "server", 2)
	if got := peerSerial(t, addr, pki.pool); got != 1 {
		t.Errorf("serial %d before the reload, want 1", got)
	}
	if err := r.Reload("test"); err != nil {
		t.Fatal(err)
	}
	if got := peerSerial(t, addr, pki.pool); got != 2 {
		t.Errorf("serial %d after the reload, want 2", got)
	}

	// A key that does not match the certificate: the reload fails and
	// serial 2 stays.
	_, otherKey := pki.issue(t, 3)
	if err := os.WriteFile(keyFile, otherKey, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.Reload("test"); err == nil {
		t.Error("reload of a mismatched pair succeeded")
	}
	if got := peerSerial(t, addr, pki.pool); got != 2 {
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
	pki := newTestPKI(t)
	certFile, keyFile := pki.writePair(t, "server", 1)
	r, err := newCertReloader(certFile, keyFile, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	addr := handshakeListener(t, r)
	waitSerial := func(want int64) {
		t.Helper()
		got := int64(0)
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if got = peerSerial(t, addr, pki.pool); got == want {
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
	pki.writePair(t, "server", 2)
	hup <- syscall.SIGHUP
	waitSerial(2)
	stop()

	// The poll, with no signal.
	stop = watch(10*time.Millisecond, nil)
	defer stop()
	pki.writePair(t, "server", 3)
	waitSerial(3)
}

// TestUpstreamMutualTLS: a wss:// backend signed by a private CA and
// requiring a client certificate echoes through sluice given
// SLUICE_UPSTREAM_CA_FILE and the client pair; without the client pair the
// client gets 502.
func TestUpstreamMutualTLS(t *testing.T) {
	defer goleak.VerifyNone(t)
	pki := newTestPKI(t)
	backendPEM, backendKey := pki.issue(t, 10)
	backendCert, err := tls.X509KeyPair(backendPEM, backendKey)
	if err != nil {
		t.Fatal(err)
	}
	clientCert, clientKey := pki.writePair(t, "client", 11)

	backend := httptest.NewUnstartedServer(echoHandler())
	backend.TLS = &tls.Config{
		Certificates: []tls.Certificate{backendCert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pki.pool,
	}
	backend.Config.ErrorLog = log.New(io.Discard, "", 0) // the refused handshake
	backend.StartTLS()
	defer backend.Close()
	upstream := "wss://" + backend.Listener.Addr().String() + "/"

	for _, tc := range []struct {
		name       string
		env        map[string]string
		wantStatus int // 0: the echo works
	}{
		{"CA and client certificate", map[string]string{
			envPrefix + "UPSTREAM_CA_FILE":          pki.cafile,
			envPrefix + "UPSTREAM_CLIENT_CERT_FILE": clientCert,
			envPrefix + "UPSTREAM_CLIENT_KEY_FILE":  clientKey,
		}, 0},
		{"no client certificate", map[string]string{envPrefix + "UPSTREAM_CA_FILE": pki.cafile}, http.StatusBadGateway},
		{"system roots", map[string]string{
			envPrefix + "UPSTREAM_CLIENT_CERT_FILE": clientCert,
			envPrefix + "UPSTREAM_CLIENT_KEY_FILE":  clientKey,
		}, http.StatusBadGateway},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.env[envPrefix+"UPSTREAM_URL"] = upstream
			tc.env[envPrefix+"SHUTDOWN_TIMEOUT"] = "3s"
			tc.env[envPrefix+"CLOSE_TIMEOUT"] = "1s"
			wsAddr, _, _, stop := startSluice(t, tc.env)
			defer stop()
			resp, err := echo(t, "ws://"+wsAddr+"/echo", nil)
			switch {
			case tc.wantStatus == 0 && err != nil:
				t.Fatalf("echo through a wss:// upstream: %v", err)
			case tc.wantStatus != 0 && (resp == nil || resp.StatusCode != tc.wantStatus):
				t.Fatalf("got %v, %v; want status %d", resp, err, tc.wantStatus)
			}
			if resp != nil && resp.Body != nil {
				resp.Body.Close()
			}
		})
	}
}

// TestTLSConfigErrors: LoadConfig names the variables of a half-set pair,
// of files that do not load, and of upstream TLS files with a ws://
// upstream.
func TestTLSConfigErrors(t *testing.T) {
	t.Parallel()
	pki := newTestPKI(t)
	certFile, keyFile := pki.writePair(t, "a", 1)
	_, otherKey := pki.writePair(t, "b", 2)
	missing := filepath.Join(pki.dir, "missing.pem")
	garbage := filepath.Join(pki.dir, "garbage.pem")
	if err := os.WriteFile(garbage, []byte("not PEM\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	const wss = "wss://backend/socket"

	for _, tc := range []struct {
		name string
		kv   []string
		want []string // lines
	}{
		{"cert without key", []string{"SLUICE_TLS_CERT_FILE", certFile}, []string{
			`SLUICE_TLS_CERT_FILE="` + certFile + `": set SLUICE_TLS_KEY_FILE too; they go together`}},
		{"key without cert", []string{"SLUICE_TLS_KEY_FILE", keyFile}, []string{
			`SLUICE_TLS_KEY_FILE="` + keyFile + `": set SLUICE_TLS_CERT_FILE too; they go together`}},
		{"unreadable cert", []string{"SLUICE_TLS_CERT_FILE", missing, "SLUICE_TLS_KEY_FILE", keyFile}, []string{
			`SLUICE_TLS_CERT_FILE+SLUICE_TLS_KEY_FILE="` + missing + "+" + keyFile + `": cannot load: open ` + missing + ": no such file or directory"}},
		{"mismatched key", []string{"SLUICE_TLS_CERT_FILE", certFile, "SLUICE_TLS_KEY_FILE", otherKey}, []string{
			`SLUICE_TLS_CERT_FILE+SLUICE_TLS_KEY_FILE="` + certFile + "+" + otherKey + `": cannot load: tls: private key does not match public key`}},
		{"CA with ws upstream", []string{"SLUICE_UPSTREAM_CA_FILE", pki.cafile}, []string{
			`SLUICE_UPSTREAM_CA_FILE="` + pki.cafile + `": applies only to a wss:// upstream, not SLUICE_UPSTREAM_URL (` + testUpstream + `)`}},
		{"client pair with ws upstream", []string{"SLUICE_UPSTREAM_CLIENT_CERT_FILE", certFile, "SLUICE_UPSTREAM_CLIENT_KEY_FILE", keyFile}, []string{
			`SLUICE_UPSTREAM_CLIENT_CERT_FILE="` + certFile + `": applies only to a wss:// upstream, not SLUICE_UPSTREAM_URL (` + testUpstream + `)`,
			`SLUICE_UPSTREAM_CLIENT_KEY_FILE="` + keyFile + `": applies only to a wss:// upstream, not SLUICE_UPSTREAM_URL (` + testUpstream + `)`}},
		{"CA not PEM", []string{"SLUICE_UPSTREAM_URL", wss, "SLUICE_UPSTREAM_CA_FILE", garbage}, []string{
			`SLUICE_UPSTREAM_CA_FILE="` + garbage + `": cannot load: no PEM certificate found`}},
		{"CA missing", []string{"SLUICE_UPSTREAM_URL", wss, "SLUICE_UPSTREAM_CA_FILE", missing}, []string{
			`SLUICE_UPSTREAM_CA_FILE="` + missing + `": cannot load: open ` + missing + ": no such file or directory"}},
		{"client cert without key", []string{"SLUICE_UPSTREAM_URL", wss, "SLUICE_UPSTREAM_CLIENT_CERT_FILE", certFile}, []string{
			`SLUICE_UPSTREAM_CLIENT_CERT_FILE="` + certFile + `": set SLUICE_UPSTREAM_CLIENT_KEY_FILE too; they go together`}},
		{"client key garbage", []string{"SLUICE_UPSTREAM_URL", wss, "SLUICE_UPSTREAM_CLIENT_CERT_FILE", certFile, "SLUICE_UPSTREAM_CLIENT_KEY_FILE", garbage}, []string{
			`SLUICE_UPSTREAM_CLIENT_CERT_FILE+SLUICE_UPSTREAM_CLIENT_KEY_FILE="` + certFile + "+" + garbage + `": cannot load: tls: failed to find any PEM data in key input`}},
	} {
		_, err := LoadConfig(environ(tc.kv...))
		if got := problemLines(t, err); strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
			t.Errorf("%s:\n%s\nwant:\n%s", tc.name, err, strings.Join(tc.want, "\n"))
		}
	}

	// Everything set and loadable.
	cfg, err := LoadConfig(environ("SLUICE_UPSTREAM_URL", wss,
		"SLUICE_TLS_CERT_FILE", certFile, "SLUICE_TLS_KEY_FILE", keyFile,
		"SLUICE_UPSTREAM_CA_FILE", pki.cafile,
		"SLUICE_UPSTREAM_CLIENT_CERT_FILE", certFile, "SLUICE_UPSTREAM_CLIENT_KEY_FILE", keyFile))
	if err != nil {
		t.Fatal(err)
	}
	tc, err := upstreamTLSConfig(cfg)
	if err != nil || tc == nil || tc.RootCAs == nil || len(tc.Certificates) != 1 || tc.MinVersion != tls.VersionTLS12 {
		t.Errorf("upstreamTLSConfig = %+v, %v; want the CA pool and one client certificate", tc, err)
	}
	// A file gone between LoadConfig and serve fails serve's start,
	// naming the variables.
	cfg.TLSKeyFile = missing
	_, err = newCertReloader(cfg.TLSCertFile, cfg.TLSKeyFile, zerolog.Nop())
	if err == nil || !strings.Contains(err.Error(), "SLUICE_TLS_CERT_FILE=") || !strings.Contains(err.Error(), "SLUICE_TLS_KEY_FILE=") {
		t.Errorf("newCertReloader with a missing key: %v", err)
	}
}
