package serve

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/rs/zerolog"
	"go.uber.org/goleak"

	"github.com/sluice-proxy/sluice/certs/certstest"
	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/proxy"
)

// TestMain fails the run if a goroutine Run started outlives the tests.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// startSluice runs Run on loopback with env (plus the upstream and
// addresses) and returns its addresses and a function that drains it and
// waits for serve to return.
func startSluice(t *testing.T, env map[string]string) (wsAddr, adminAddr string, srv *proxy.Server, stop func()) {
	t.Helper()
	return startSluiceLogged(t, env, zerolog.Nop())
}

// startSluiceLogged is startSluice logging to log. The drain delay is off
// unless env sets it, so that stop does not wait for it.
func startSluiceLogged(t *testing.T, env map[string]string, log zerolog.Logger) (wsAddr, adminAddr string, srv *proxy.Server, stop func()) {
	t.Helper()
	env[config.Prefix+"LISTEN_ADDR"] = "127.0.0.1:0"
	env[config.Prefix+"ADMIN_ADDR"] = "127.0.0.1:0"
	if _, ok := env[config.Prefix+"DRAIN_DELAY"]; !ok {
		env[config.Prefix+"DRAIN_DELAY"] = "0"
	}
	cfg, err := config.Load(env)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, cfg, log, func(l Listening) {
			wsAddr, adminAddr, srv = l.Addr, l.AdminAddr, l.Server
			close(ready)
		})
	}()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		t.Fatalf("Run: %v", err)
	}
	return wsAddr, adminAddr, srv, func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
}

// TestServeListenerFailure: when the WebSocket listener fails, Run
// returns its error only after closing the admin listener and ending
// every goroutine it started.
func TestServeListenerFailure(t *testing.T) {
	defer goleak.VerifyNone(t)
	cfg, err := config.Load(map[string]string{"SLUICE_UPSTREAM_URL": "ws://backend:8080/socket", "SLUICE_LISTEN_ADDR": "127.0.0.1:0",
		"SLUICE_ADMIN_ADDR": "127.0.0.1:0", "SLUICE_DRAIN_DELAY": "20s", "SLUICE_SHUTDOWN_TIMEOUT": "25s"})
	if err != nil {
		t.Fatal(err)
	}
	type addrs struct{ ws, admin string }
	ready := make(chan addrs, 1)
	done := make(chan error, 1)
	go func() {
		done <- Run(context.Background(), cfg, zerolog.Nop(), func(l Listening) {
			ready <- addrs{l.Addr, l.AdminAddr}
		})
	}()
	var a addrs
	select {
	case a = <-ready:
	case err := <-done:
		t.Fatalf("Run: %v", err)
	}

	// Shut the listening socket down under Run: accept then fails with
	// EINVAL, as it would for a listener broken some other way.
	shutdownListener(t, a.ws)
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Run returned nil after its listener failed")
		}
		t.Logf("Run: %v", err)
	case <-time.After(10 * time.Second): // well short of the 20 s drain delay
		t.Fatal("Run did not return after its listener failed")
	}
	if c, err := net.DialTimeout("tcp", a.admin, time.Second); err == nil {
		c.Close()
		t.Errorf("admin listener %s still accepts after Run returned", a.admin)
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

// TestServeTLS: with a certificate pair, Run speaks wss:// on the
// WebSocket listener and proxies to a ws:// backend; plain ws:// is
// refused there, and the admin listener stays plain HTTP.
func TestServeTLS(t *testing.T) {
	defer goleak.VerifyNone(t)
	pki := certstest.New(t)
	certFile, keyFile := pki.WritePair(t, "server", 1)
	backend := httptest.NewServer(echoHandler())
	defer backend.Close()
	wsAddr, adminAddr, _, stop := startSluice(t, map[string]string{
		config.Prefix + "UPSTREAM_URL":     "ws://" + backend.Listener.Addr().String() + "/",
		config.Prefix + "TLS_CERT_FILE":    certFile,
		config.Prefix + "TLS_KEY_FILE":     keyFile,
		config.Prefix + "SHUTDOWN_TIMEOUT": "3s",
		config.Prefix + "CLOSE_TIMEOUT":    "1s",
	})
	defer stop()

	if _, err := echo(t, "wss://"+wsAddr+"/echo", pki.Pool); err != nil {
		t.Fatalf("wss:// through sluice: %v", err)
	}
	if got := pki.PeerSerial(t, wsAddr); got != 1 {
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

// TestServeTLSFileGone: a certificate file gone between Load and Run
// fails the start with an error naming both variables.
func TestServeTLSFileGone(t *testing.T) {
	defer goleak.VerifyNone(t)
	pki := certstest.New(t)
	certFile, keyFile := pki.WritePair(t, "server", 1)
	cfg, err := config.Load(map[string]string{
		config.Prefix + "UPSTREAM_URL":  "ws://127.0.0.1:1/",
		config.Prefix + "LISTEN_ADDR":   "127.0.0.1:0",
		config.Prefix + "ADMIN_ADDR":    "",
		config.Prefix + "TLS_CERT_FILE": certFile,
		config.Prefix + "TLS_KEY_FILE":  keyFile,
	})
	if err != nil {
		t.Fatal(err)
	}
	cfg.TLSKeyFile = filepath.Join(pki.Dir, "missing.pem")
	err = Run(context.Background(), cfg, zerolog.Nop(), func(Listening) { t.Error("Run listened without its key") })
	if err == nil || !strings.Contains(err.Error(), "SLUICE_TLS_CERT_FILE=") || !strings.Contains(err.Error(), "SLUICE_TLS_KEY_FILE=") {
		t.Errorf("Run with a missing key: %v; want an error naming both variables", err)
	}
}

// TestUpstreamMutualTLS: a wss:// backend signed by a private CA and
// requiring a client certificate echoes through sluice given
// SLUICE_UPSTREAM_CA_FILE and the client pair; without the client pair the
// client gets 502.
func TestUpstreamMutualTLS(t *testing.T) {
	defer goleak.VerifyNone(t)
	pki := certstest.New(t)
	backendPEM, backendKey := pki.Issue(t, 10)
	backendCert, err := tls.X509KeyPair(backendPEM, backendKey)
	if err != nil {
		t.Fatal(err)
	}
	clientCert, clientKey := pki.WritePair(t, "client", 11)

	backend := httptest.NewUnstartedServer(echoHandler())
	backend.TLS = &tls.Config{
		Certificates: []tls.Certificate{backendCert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pki.Pool,
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
			config.Prefix + "UPSTREAM_CA_FILE":          pki.CAFile,
			config.Prefix + "UPSTREAM_CLIENT_CERT_FILE": clientCert,
			config.Prefix + "UPSTREAM_CLIENT_KEY_FILE":  clientKey,
		}, 0},
		{"no client certificate", map[string]string{config.Prefix + "UPSTREAM_CA_FILE": pki.CAFile}, http.StatusBadGateway},
		{"system roots", map[string]string{
			config.Prefix + "UPSTREAM_CLIENT_CERT_FILE": clientCert,
			config.Prefix + "UPSTREAM_CLIENT_KEY_FILE":  clientKey,
		}, http.StatusBadGateway},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.env[config.Prefix+"UPSTREAM_URL"] = upstream
			tc.env[config.Prefix+"SHUTDOWN_TIMEOUT"] = "3s"
			tc.env[config.Prefix+"CLOSE_TIMEOUT"] = "1s"
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

// TestAdminPprof: Go's profiles are on the admin listener only when
// SLUICE_PPROF is true, and never on the proxy listener.
func TestAdminPprof(t *testing.T) {
	defer goleak.VerifyNone(t)
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	get := func(t *testing.T, url string) (int, []byte) {
		t.Helper()
		resp, err := client.Get(url)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("GET %s: reading the body: %v", url, err)
		}
		return resp.StatusCode, body
	}
	// isProfile reports whether b is a gzipped profile, as go tool pprof
	// reads it.
	isProfile := func(b []byte) bool {
		zr, err := gzip.NewReader(bytes.NewReader(b))
		if err != nil {
			return false
		}
		raw, err := io.ReadAll(zr)
		return err == nil && len(raw) > 0
	}

	for _, tt := range []struct {
		name string
		env  map[string]string
		on   bool
	}{
		{"unset", map[string]string{}, false},
		{"false", map[string]string{config.Prefix + "PPROF": "false"}, false},
		{"true", map[string]string{config.Prefix + "PPROF": "true"}, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tt.env[config.Prefix+"UPSTREAM_URL"] = "ws://127.0.0.1:1/"
			tt.env[config.Prefix+"SHUTDOWN_TIMEOUT"] = "3s"
			wsAddr, adminAddr, _, stop := startSluice(t, tt.env)
			defer stop()

			if code, _ := get(t, "http://"+adminAddr+"/healthz"); code != http.StatusOK {
				t.Fatalf("/healthz: %d, want 200", code)
			}
			for _, path := range []string{"/debug/pprof/", "/debug/pprof/heap", "/debug/pprof/cmdline"} {
				if code, _ := get(t, "http://"+wsAddr+path); code == http.StatusOK {
					t.Errorf("proxy listener serves %s", path)
				}
				code, _ := get(t, "http://"+adminAddr+path)
				if !tt.on && code != http.StatusNotFound {
					t.Errorf("admin %s: %d, want 404 with profiles off", path, code)
				}
				if tt.on && code != http.StatusOK {
					t.Errorf("admin %s: %d, want 200 with profiles on", path, code)
				}
			}
			if !tt.on {
				return
			}
			for _, path := range []string{"/debug/pprof/heap", "/debug/pprof/goroutine", "/debug/pprof/profile?seconds=1"} {
				code, body := get(t, "http://"+adminAddr+path)
				if code != http.StatusOK || !isProfile(body) {
					t.Errorf("admin %s: %d with %d bytes, want 200 and a gzipped profile", path, code, len(body))
				}
			}
			if _, body := get(t, "http://"+adminAddr+"/debug/pprof/cmdline"); len(body) == 0 {
				t.Error("admin /debug/pprof/cmdline: empty")
			}
		})
	}
}

// TestServeProxyProtocolUnderTLS: with SLUICE_PROXY_PROTOCOL and TLS, the
// PROXY header comes first, then TLS; a plain request passed through
// reaches the app with the header's client in X-Forwarded-For and https
// in X-Forwarded-Proto.
func TestServeProxyProtocolUnderTLS(t *testing.T) {
	defer goleak.VerifyNone(t)
	pki := certstest.New(t)
	certFile, keyFile := pki.WritePair(t, "server", 1)
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, r.Header.Get("X-Forwarded-For")+" "+r.Header.Get("X-Forwarded-Proto"))
	}))
	defer backend.Close()
	wsAddr, _, _, stop := startSluice(t, map[string]string{
		config.Prefix + "UPSTREAM_URL":     "ws://" + backend.Listener.Addr().String(),
		config.Prefix + "TLS_CERT_FILE":    certFile,
		config.Prefix + "TLS_KEY_FILE":     keyFile,
		config.Prefix + "PROXY_PROTOCOL":   "true",
		config.Prefix + "SHUTDOWN_TIMEOUT": "3s",
	})
	defer stop()

	raw, err := net.DialTimeout("tcp", wsAddr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(raw, "PROXY TCP4 203.0.113.7 127.0.0.1 40001 443\r\n")
	c := tls.Client(raw, &tls.Config{RootCAs: pki.Pool, ServerName: "localhost"})
	io.WriteString(c, "GET /who HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "203.0.113.7 https" {
		t.Errorf("the app saw X-Forwarded-For and -Proto %q, want \"203.0.113.7 https\"", b)
	}
}
