package proxy

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"io"
	"net/http"
	"net/textproto"
	"strings"
	"testing"

	"github.com/gobwas/ws"
	"github.com/prometheus/client_golang/prometheus"
)

// forwardCases are upgrade requests as net/http parses them, for
// forwardedHeader's tests and benchmark.
var forwardCases = []struct {
	name    string
	request string
	tls     bool
	xff     string // client.xff
}{
	{name: "harness", request: "GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: Go-http-client/1.1\r\n" +
		"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n\r\n"},
	{name: "browser", tls: true, request: "GET /chat?room=1 HTTP/1.1\r\nHost: app.example.com:8443\r\n" +
		"Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nOrigin: https://app.example.com\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" +
		"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nSec-WebSocket-Protocol: chat, superchat\r\n" +
		"Cookie: a=1\r\nCookie: b=2\r\nAccept-Language: en\r\nCache-Control: no-cache\r\nPragma: no-cache\r\n" +
		"User-Agent: Mozilla/5.0\r\nAccept-Encoding: gzip, deflate, br\r\n\r\n"},
	{name: "hop by hop", request: "GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, x-hop , KEEP-ALIVE\r\n" +
		"Connection: x-other\r\nUpgrade: websocket\r\nX-Hop: 1\r\nX-Other: 2\r\nKeep-Alive: timeout=5\r\n" +
		"Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\nTe: trailers\r\nX-Kept: yes\r\n\r\n"},
	{name: "forwarded", request: "GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 192.0.2.1, 198.51.100.2\r\n" +
		"X-Forwarded-For: 203.0.113.3\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: spoofed\r\nX-A:  padded  \r\n\r\n"},
	{name: "trusted xff", xff: "192.0.2.1, 198.51.100.2", request: "GET / HTTP/1.1\r\nHost: h\r\n" +
		"X-Forwarded-For: 192.0.2.1, 198.51.100.2\r\n\r\n"},
	{name: "connection names forwarded ones", request: "GET / HTTP/1.1\r\nHost: h\r\n" +
		"Connection: X-Forwarded-For, upgrade\r\nX-Forwarded-For: 192.0.2.1\r\nEmpty:\r\n\r\n"},
}

func parseForwardCase(tb testing.TB, i int) *http.Request {
	c := forwardCases[i]
	r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(c.request)))
	if err != nil {
		tb.Fatal(err)
	}
	r.RemoteAddr = "10.0.0.9:4711"
	if c.tls {
		r.TLS = &tls.ConnectionState{}
	}
	return r
}

// fromHTTP is the request Serve would have read for r.
func fromHTTP(r *http.Request) *request {
	var req request
	requestFromHTTP(r, &req)
	return &req
}

// referenceForwarded is how forwardedHeader's output was built before it
// wrote straight from the request: copy, delete, set, http.Header.Write.
func referenceForwarded(r *http.Request, clientIP, xff string) string {
	h := r.Header.Clone()
	for _, v := range r.Header.Values("Connection") {
		for _, name := range strings.Split(v, ",") {
			if name = textproto.TrimString(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, name := range hopHeaders {
		h.Del(name)
	}
	if prior := r.Header.Values("X-Forwarded-For"); len(prior) > 0 {
		clientIP = strings.Join(prior, ", ") + ", " + clientIP
	}
	h.Set("X-Forwarded-For", clientIP)
	if xff != "" {
		h.Set("X-Forwarded-For", xff)
	}
	proto := "http"
	if r.TLS != nil {
		proto = "https"
	}
	h.Set("X-Forwarded-Proto", proto)
	h.Set("X-Forwarded-Host", r.Host)
	var b bytes.Buffer
	h.Write(&b)
	return b.String()
}

func TestForwardedHeaderAsHeaderWrite(t *testing.T) {
	for i, c := range forwardCases {
		t.Run(c.name, func(t *testing.T) {
			r := parseForwardCase(t, i)
			var h forwardedHeader
			h.forwardTo(fromHTTP(r), "10.0.0.9", c.xff)
			var got bytes.Buffer
			n, err := h.WriteTo(&got)
			if err != nil || n != int64(got.Len()) {
				t.Fatalf("WriteTo = %d, %v; wrote %d bytes", n, err, got.Len())
			}
			if want := referenceForwarded(r, "10.0.0.9", c.xff); got.String() != want {
				t.Errorf("got\n%s\nwant\n%s", got.String(), want)
			}
		})
	}
}

// TestForwardedHeaderCleansValues: values a parser other than net/http's
// could let through are cleaned as http.Header.Write cleans them.
func TestForwardedHeaderCleansValues(t *testing.T) {
	r := &http.Request{Host: "h", Header: http.Header{
		"X-Split":  {"a\r\nInjected: 1"},
		"Bad Name": {"x"},
	}}
	var h forwardedHeader
	h.forwardTo(fromHTTP(r), "10.0.0.9", "")
	var got strings.Builder
	h.WriteTo(&got)
	if want := referenceForwarded(r, "10.0.0.9", ""); got.String() != want {
		t.Errorf("got\n%s\nwant\n%s", got.String(), want)
	}
}

func BenchmarkForwardedHeader(b *testing.B) {
	for i, c := range forwardCases {
		b.Run(c.name, func(b *testing.B) {
			r := parseForwardCase(b, i)
			b.ReportAllocs()
			for b.Loop() {
				var h forwardedHeader
				h.forwardTo(fromHTTP(r), "10.0.0.9", c.xff)
				h.WriteTo(io.Discard)
			}
		})
	}
}

func TestValidKey(t *testing.T) {
	for _, c := range []struct {
		key  string
		want bool
	}{
		{"dGhlIHNhbXBsZSBub25jZQ==", true},
		{"AAAAAAAAAAAAAAAAAAAAAA==", true},
		{"dGhlIHNhbXBsZSBub25jZQ", false},    // no padding
		{"dGhlIHNhbXBsZSBub25jZQ=", false},   // short padding
		{"dGhlIHNhbXBsZSBub25jZQ===", false}, // 25 characters
		{"dGhlIHNhbXBsZSBub25jZQ!=", false},  // not base64
		{"dGhlIHNhbXBsZSBub25jZWVl", false},  // 18 bytes
		{"", false},
	} {
		if got := validKey(c.key); got != c.want {
			t.Errorf("validKey(%q) = %v, want %v", c.key, got, c.want)
		}
	}
	if n := testing.AllocsPerRun(100, func() { validKey("dGhlIHNhbXBsZSBub25jZQ==") }); n != 0 {
		t.Errorf("validKey allocates %v times", n)
	}
}

// TestCloseCodeSeries: the cached series are closeCodes' own children.
func TestCloseCodeSeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := newMetrics(reg)
	cases := []struct {
		upstream, sent bool
		code           ws.StatusCode
		leg, dir, lbl  string
	}{
		{false, false, ws.StatusNormalClosure, "client", "received", "1000"},
		{true, true, ws.StatusGoingAway, "upstream", "sent", "1001"},
		{false, true, 1015, "client", "sent", "1015"},
		{true, false, 4000, "upstream", "received", "4xxx"},
		{false, false, 999, "client", "received", "999"},
	}
	for _, c := range cases {
		m.closeCode(c.upstream, c.sent, c.code).Inc()
		m.closeCode(c.upstream, c.sent, c.code).Inc() // cached the second time
		if got := metricValue(t, reg, "sluice_close_codes_total", "leg", c.leg, "direction", c.dir, "code", c.lbl); got != 2 {
			t.Errorf("%s %s %s = %v, want 2", c.leg, c.dir, c.lbl, got)
		}
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "sluice_close_codes_total" && len(mf.GetMetric()) != len(cases) {
			t.Errorf("%d close code series, want the %d used", len(mf.GetMetric()), len(cases))
		}
	}
}
