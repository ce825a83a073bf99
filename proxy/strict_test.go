package proxy

import (
	"bufio"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/sluice-proxy/sluice/internal/wstest"
)

// probeUpgrade is a valid upgrade request but for its first lines: the
// request line and Host are the probe's.
func probeUpgrade(requestLine string, header ...string) string {
	return requestLine + "\r\n" + strings.Join(header, "\r\n") + "\r\n" +
		"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" +
		"Sec-WebSocket-Version: 13\r\n\r\n"
}

// strictProbes are requests whose verdict sluice's parser must share with
// net/http's server: accepted (101) or refused (4xx, 5xx, or closed).
// differ names a deliberate difference, with why.
var strictProbes = []struct {
	name, raw string
	differ    string
}{
	{"valid", probeUpgrade("GET / HTTP/1.1", "Host: h"), ""},
	{"LF line endings", strings.ReplaceAll(probeUpgrade("GET / HTTP/1.1", "Host: h"), "\r\n", "\n"), ""},
	{"Host with port", probeUpgrade("GET / HTTP/1.1", "Host: h:8080"), ""},
	{"Host an IPv6 literal", probeUpgrade("GET / HTTP/1.1", "Host: [::1]:80"), ""},
	{"Host with a path and a script", probeUpgrade("GET / HTTP/1.1", "Host: evil.com/x y<script>"), ""},
	{"Host with a quote", probeUpgrade("GET / HTTP/1.1", `Host: h"`), ""},
	{"Host with a slash", probeUpgrade("GET / HTTP/1.1", "Host: h/x"), ""},
	{"no Host", probeUpgrade("GET / HTTP/1.1", "X-A: 1"), ""},
	{"two Hosts", probeUpgrade("GET / HTTP/1.1", "Host: h", "Host: i"), ""},
	{"empty Host", probeUpgrade("GET / HTTP/1.1", "Host:"),
		"RFC 6455 §4.1: an upgrade's Host names the server; net/http allows an empty Host for any request"},
	{"absolute form", probeUpgrade("GET http://example.com/x HTTP/1.1", "Host: other"), ""},
	{"absolute form, bad Host", probeUpgrade("GET http://example.com/x HTTP/1.1", "Host: a b"), ""},
	{"HTTP/2.0", probeUpgrade("GET / HTTP/2.0", "Host: h"), ""},
	{"HTTP/3.0", probeUpgrade("GET / HTTP/3.0", "Host: h"), ""},
	{"HTTP/0.9", probeUpgrade("GET / HTTP/0.9", "Host: h"), ""},
	{"HTTP/1.0", probeUpgrade("GET / HTTP/1.0", "Host: h"),
		"RFC 6455 §4.1: an upgrade needs HTTP/1.1; gorilla does not check the version"},
	{"bad version", probeUpgrade("GET / HTTP/x", "Host: h"), ""},
	{"method not a token", probeUpgrade("G@T / HTTP/1.1", "Host: h"), ""},
	{"POST", probeUpgrade("POST / HTTP/1.1", "Host: h", "Content-Length: 0"), ""},
	{"empty Content-Length", probeUpgrade("GET / HTTP/1.1", "Host: h", "Content-Length:"), ""},
	{"Content-Length not a number", probeUpgrade("GET / HTTP/1.1", "Host: h", "Content-Length: +0"), ""},
	{"two different Content-Lengths", probeUpgrade("GET / HTTP/1.1", "Host: h", "Content-Length: 0", "Content-Length: 1"), ""},
	{"Content-Length 0", probeUpgrade("GET / HTTP/1.1", "Host: h", "Content-Length: 0"), ""},
	{"a body", probeUpgrade("GET / HTTP/1.1", "Host: h", "Content-Length: 4") + "body", ""},
	{"folded line", probeUpgrade("GET / HTTP/1.1", "Host: h", "X-A: 1", " 2"),
		"RFC 9112 §5.2 lets a server refuse obsolete line folding, and a proxy that unfolds can disagree with one that does not; net/http unfolds"},
	{"space before colon", probeUpgrade("GET / HTTP/1.1", "Host: h", "X-A : 1"), ""},
	{"control byte in a value", probeUpgrade("GET / HTTP/1.1", "Host: h", "X-A: a\x01b"), ""},
	{"underscore in a name", probeUpgrade("GET / HTTP/1.1", "Host: h", "X_A: 1"), ""},
	{"header too large", probeUpgrade("GET / HTTP/1.1", "Host: h", "X-A: "+strings.Repeat("a", 40<<10)), ""},
}

// verdict sends raw to addr and reports whether it was accepted (101),
// with the status line read.
func verdict(t *testing.T, addr, raw string) (accepted bool, status string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, wstest.IOTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(wstest.IOTimeout))
	go c.Write([]byte(raw)) // a refusal may come before it is all written
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return false, "closed: " + err.Error()
	}
	line = strings.TrimSpace(line)
	return strings.HasPrefix(line, "HTTP/1.1 101 "), line
}

// TestParserAsStrictAsNetHTTP sends each probe to sluice and to a
// net/http server that upgrades with gorilla/websocket, with the same
// header bound, and wants the same verdict, unless the probe names why
// not.
func TestParserAsStrictAsNetHTTP(t *testing.T) {
	checkLeaks(t)
	b := newEchoBackend(t)
	p := startTestProxy(t, b, Options{MaxHeaderBytes: 32 << 10})
	up := websocket.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}
	ref := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err == nil {
			c.Close()
		}
	}))
	ref.Config.MaxHeaderBytes = 32 << 10
	ref.Start()
	defer ref.Close()
	refAddr := strings.TrimPrefix(ref.URL, "http://")
	for _, pr := range strictProbes {
		t.Run(pr.name, func(t *testing.T) {
			got, gotLine := verdict(t, p.addr, pr.raw)
			want, wantLine := verdict(t, refAddr, pr.raw)
			switch {
			case pr.differ == "" && got != want:
				t.Errorf("sluice %q, net/http %q", gotLine, wantLine)
			case pr.differ != "" && got == want:
				t.Errorf("listed as a difference (%s), but sluice %q and net/http %q agree", pr.differ, gotLine, wantLine)
			}
		})
	}
}

// TestHTTP2RequestLine: HTTP/2.0 in an HTTP/1 request line gets 505, as
// from net/http.
func TestHTTP2RequestLine(t *testing.T) {
	checkLeaks(t)
	b := newEchoBackend(t)
	p := startTestProxy(t, b, Options{})
	if _, line := verdict(t, p.addr, probeUpgrade("GET / HTTP/2.0", "Host: h")); !strings.HasPrefix(line, "HTTP/1.1 505 ") {
		t.Errorf("answer %q, want 505", line)
	}
}

// TestAbsoluteFormWins: the host of an absolute-form target is the
// request's host, not the Host header (RFC 9112 §3.2.2), and an invalid
// Host never reaches the upstream.
func TestAbsoluteFormWins(t *testing.T) {
	checkLeaks(t)
	hosts := make(chan string, 4)
	b := wstest.ServeRaw(t, wstest.RawOptions{BeforeUpgrade: func(h http.Header) {
		hosts <- h.Get("X-Forwarded-Host")
	}}, func(c *wstest.RawConn) { wstest.Echo(c) })
	p := startTestProxy(t, &echoBackend{RawBackend: b}, Options{})
	if ok, line := verdict(t, p.addr, probeUpgrade("GET ws://example.com/x HTTP/1.1", "Host: other")); !ok {
		t.Fatalf("absolute form refused: %q", line)
	}
	if got := <-hosts; got != "example.com" {
		t.Errorf("X-Forwarded-Host %q, want example.com", got)
	}
	if ok, line := verdict(t, p.addr, probeUpgrade("GET / HTTP/1.1", "Host: evil.com/x y<script>")); ok || !strings.HasPrefix(line, "HTTP/1.1 400 ") {
		t.Errorf("bad Host answered %q, want 400", line)
	}
	if n := b.Accepts.Load(); n != 1 {
		t.Errorf("the upstream saw %d connections, want only the valid one", n)
	}
}
