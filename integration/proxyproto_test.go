package integration

// PROXY protocol (SLUICE_PROXY_PROTOCOL): the address a load balancer
// puts in the header is the client everywhere sluice names one.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"testing"

	"github.com/pires/go-proxyproto"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/internal/wstest"
	"github.com/sluice-proxy/sluice/proxy"
)

// startSluiceProxyProtocol is startSluiceEnv with SLUICE_PROXY_PROTOCOL on
// and the listener wrapped as serve.Run wraps it.
func startSluiceProxyProtocol(t *testing.T, upstream string, env map[string]string) *sluiceUnderTest {
	t.Helper()
	environ := harnessEnv()
	maps.Copy(environ, env)
	environ[config.Prefix+"UPSTREAM_URL"] = upstream
	environ[config.Prefix+"PROXY_PROTOCOL"] = "true"
	cfg, err := config.Load(environ)
	if err != nil {
		t.Fatalf("configuration:\n%v", err)
	}
	reg := prometheus.NewRegistry()
	opts, err := cfg.ProxyOptions(zerolog.New(testLog(t)).Level(zerolog.InfoLevel), reg)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := proxy.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(srv.ProxyProtocolListener(ln)) }()
	s := &sluiceUnderTest{srv: srv, addr: ln.Addr().String(), url: "ws://" + ln.Addr().String(), serveErr: served, reg: reg}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), wstest.ShutdownTimeout)
		defer cancel()
		if err := s.shutdown(ctx); err != nil {
			t.Errorf("sluice Shutdown: %v", err)
		}
	})
	return s
}

// proxyHeader is a PROXY header of version v (1 or 2) for a TCP
// connection from client to 127.0.0.1:80.
func proxyHeader(t *testing.T, v byte, client string) []byte {
	src, err := net.ResolveTCPAddr("tcp", client)
	if err != nil {
		t.Fatal(err)
	}
	h := proxyproto.HeaderProxyFromAddrs(v, src, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 80})
	b, err := h.Format()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkProxyProtocolClient sends header then a plain request and an
// upgrade on two connections: the app must see the header's address in
// X-Forwarded-For, and sluice's session list (the status page) must name it.
func checkProxyProtocolClient(t *testing.T, s *sluiceUnderTest, header func() []byte, clientIP, clientAddr string) {
	t.Helper()
	r := dialRaw(t, s.addr)
	r.c.Write(header())
	code, body := r.get(t, "/who")
	var seen seenRequest
	if err := json.Unmarshal([]byte(body), &seen); err != nil || code != 200 {
		t.Fatalf("GET /who after the PROXY header: %d %q", code, body)
	}
	if got := seen.Header.Get("X-Forwarded-For"); got != clientIP {
		t.Errorf("X-Forwarded-For at the app = %q, want %q from the PROXY header", got, clientIP)
	}

	up := dialRaw(t, s.addr)
	up.upgrade(t, header(), "/ws", "upgrade after the PROXY header")
	// The session joins the list just after its 101 is written.
	waitFor(t, wstest.IOTimeout, "the upgraded session in Snapshot()", func() bool { return len(s.srv.Snapshot()) == 1 })
	if snap := s.srv.Snapshot(); len(snap) != 1 || snap[0].Client != clientAddr {
		t.Errorf("sessions = %+v, want one whose client is %s", snap, clientAddr)
	}
}

// TestProxyProtocolV1: a text (v1) header's source is the client.
func TestProxyProtocolV1(t *testing.T) {
	app := startHTTPApp(t)
	s := startSluiceProxyProtocol(t, app.url, nil)
	checkProxyProtocolClient(t, s, func() []byte { return []byte("PROXY TCP4 203.0.113.7 127.0.0.1 40001 80\r\n") },
		"203.0.113.7", "203.0.113.7:40001")
}

// TestProxyProtocolV2: a binary (v2) header's source is the client; a
// trusted peer (127.0.0.1) may send it.
func TestProxyProtocolV2(t *testing.T) {
	app := startHTTPApp(t)
	s := startSluiceProxyProtocol(t, app.url, map[string]string{config.Prefix + "TRUSTED_PROXIES": "127.0.0.1"})
	checkProxyProtocolClient(t, s, func() []byte { return proxyHeader(t, 2, "198.51.100.20:5000") },
		"198.51.100.20", "198.51.100.20:5000")
}

// expectRefused reads from r until the connection ends, and fails if
// sluice answered anything.
func expectRefused(t *testing.T, r *rawHTTP) {
	t.Helper()
	b, err := io.ReadAll(r.br)
	if len(b) > 0 || (err != nil && !errors.Is(err, net.ErrClosed) && !wstest.IsReset(err)) {
		t.Errorf("refused connection: read %q, %v; want the connection closed without an answer", b, err)
	}
}

// TestProxyProtocolRequired: a connection without a header is closed
// unanswered, counted.
func TestProxyProtocolRequired(t *testing.T) {
	app := startHTTPApp(t)
	s := startSluiceProxyProtocol(t, app.url, nil)
	r := dialRaw(t, s.addr)
	fmt.Fprint(r.c, "GET /health HTTP/1.1\r\nHost: app\r\n\r\n")
	expectRefused(t, r)
	if got := metricValue(t, s, "sluice_connections_rejected_total", "reason", "proxy_protocol"); got != 1 {
		t.Errorf("sluice_connections_rejected_total{reason=\"proxy_protocol\"} = %v, want 1", got)
	}
}

// TestProxyProtocolUntrustedPeer: with SLUICE_TRUSTED_PROXIES set, a peer
// outside them is closed even with a valid header.
func TestProxyProtocolUntrustedPeer(t *testing.T) {
	app := startHTTPApp(t)
	s := startSluiceProxyProtocol(t, app.url, map[string]string{config.Prefix + "TRUSTED_PROXIES": "10.0.0.0/8"})
	r := dialRaw(t, s.addr)
	r.c.Write(proxyHeader(t, 1, "203.0.113.7:40001"))
	fmt.Fprint(r.c, "GET /health HTTP/1.1\r\nHost: app\r\n\r\n")
	expectRefused(t, r)
	// Counted before the connection was closed.
	if got := metricValue(t, s, "sluice_connections_rejected_total", "reason", "proxy_protocol"); got != 1 {
		t.Errorf("sluice_connections_rejected_total{reason=\"proxy_protocol\"} = %v, want 1", got)
	}
}

// TestProxyProtocolSilentPeer: a peer that sends nothing is closed once
// SLUICE_HANDSHAKE_TIMEOUT has passed, counted.
func TestProxyProtocolSilentPeer(t *testing.T) {
	app := startHTTPApp(t)
	s := startSluiceProxyProtocol(t, app.url, map[string]string{config.Prefix + "HANDSHAKE_TIMEOUT": "200ms"})
	r := dialRaw(t, s.addr) // its deadline, wstest.IOTimeout, is far longer
	expectRefused(t, r)
	if got := metricValue(t, s, "sluice_connections_rejected_total", "reason", "proxy_protocol"); got != 1 {
		t.Errorf("sluice_connections_rejected_total{reason=\"proxy_protocol\"} = %v, want 1", got)
	}
}
