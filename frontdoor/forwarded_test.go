package frontdoor

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"strings"
	"testing"
	"time"
)

// forwardCases are upgrade requests as net/http parses them, for
// ForwardedHeader's tests and benchmark.
var forwardCases = []struct {
	name    string
	request string
	tls     bool
	xff     string // client.xff
	trusted bool   // client.trustedPeer
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
	{name: "spoofed identity", request: spoofedIdentity},
	{name: "identity from a trusted proxy", trusted: true, xff: "198.51.100.2", request: spoofedIdentity},
}

// spoofedIdentity names a client in every header and spelling that a
// backend might read an address from.
const spoofedIdentity = "GET / HTTP/1.1\r\nHost: h\r\nX-Real-IP: 6.6.6.6\r\nx-real-ip: 6.6.6.7\r\n" +
	"Forwarded: for=6.6.6.8\r\nFORWARDED: for=6.6.6.9\r\nX_Forwarded_For: 6.6.6.10\r\nx_forwarded_for: 6.6.6.11\r\n" +
	"X-Forwarded_Host: evil\r\nX_Real_Ip: 6.6.6.12\r\nX_Forwarded_Proto: https\r\nX-Forwarded-For: 198.51.100.2\r\n" +
	"X-Kept_Name: yes\r\n\r\n"

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
func fromHTTP(r *http.Request) *Request {
	var req Request
	RequestFromHTTP(r, &req)
	return &req
}

// referenceForwarded is how ForwardedHeader's output was built before it
// wrote straight from the request: copy, delete, set, http.Header.Write.
func referenceForwarded(r *http.Request, clientIP, xff string, trusted bool) string {
	h := r.Header.Clone()
	for name := range h {
		// Who the client is: only a trusted proxy's Forwarded and
		// X-Real-IP go on, never another spelling of them.
		switch strings.ToLower(strings.ReplaceAll(name, "_", "-")) {
		case "forwarded", "x-real-ip":
			if !trusted || strings.Contains(name, "_") {
				delete(h, name)
			}
		case "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto":
			if strings.Contains(name, "_") {
				delete(h, name)
			}
		}
	}
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
			var h ForwardedHeader
			h.ForwardTo(fromHTTP(r), "10.0.0.9", Client{XFF: c.xff, TrustedPeer: c.trusted})
			var got bytes.Buffer
			n, err := h.WriteTo(&got)
			if err != nil || n != int64(got.Len()) {
				t.Fatalf("WriteTo = %d, %v; wrote %d bytes", n, err, got.Len())
			}
			if want := referenceForwarded(r, "10.0.0.9", c.xff, c.trusted); got.String() != want {
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
	var h ForwardedHeader
	h.ForwardTo(fromHTTP(r), "10.0.0.9", Client{})
	var got strings.Builder
	h.WriteTo(&got)
	if want := referenceForwarded(r, "10.0.0.9", "", false); got.String() != want {
		t.Errorf("got\n%s\nwant\n%s", got.String(), want)
	}
}

func BenchmarkForwardedHeader(b *testing.B) {
	for i, c := range forwardCases {
		b.Run(c.name, func(b *testing.B) {
			r := parseForwardCase(b, i)
			b.ReportAllocs()
			for b.Loop() {
				var h ForwardedHeader
				h.ForwardTo(fromHTTP(r), "10.0.0.9", Client{XFF: c.xff})
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

// manyHeaders is an upgrade request of about size bytes: a Connection
// header listing tokens names, and short header fields, about half of
// which the Connection header lists. Header handling must stay linear
// in its size (the forwarded-header writer once walked every Connection
// token for every field).
func manyHeaders(size int) string {
	var b strings.Builder
	b.WriteString("GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nConnection: Upgrade")
	// Tokens of 2 characters (3 bytes with the comma) and fields of 7
	// bytes in the proportions of the request that cost 150 ms: 6,000
	// tokens and 1,800 fields make 30,600 bytes.
	tokens, fields := size*6000/30600, size*1800/30600
	const digits = "0123456789abcdefghijklmnopqrstuvwxyz"
	name := func(i int) string { i %= 36 * 36; return digits[i/36:i/36+1] + digits[i%36:i%36+1] }
	for i := range tokens {
		b.WriteString("," + name(2*i)) // the even names
	}
	b.WriteString("\r\n")
	for i := range fields {
		b.WriteString(name(i) + ": v\r\n")
	}
	b.WriteString("\r\n")
	return b.String()
}

// TestForwardedHeaderLinear: a 30 KB request of 6,000 Connection tokens
// and 1,800 fields loses exactly the fields its Connection lists, and a
// request 36 times its size is handled in a small fraction of a second:
// quadratic work took minutes there (and 150 ms at 29 KB).
func TestForwardedHeaderLinear(t *testing.T) {
	raw := manyHeaders(30600)
	r, _, err := readFrom(t, raw, 4096, 32<<10)
	if err != nil {
		t.Fatalf("read the 30 KB request: %v", err)
	}
	var h ForwardedHeader
	h.ForwardTo(r, "10.0.0.9", Client{})
	var got strings.Builder
	h.WriteTo(&got)
	hr, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
	if err != nil {
		t.Fatal(err)
	}
	hr.RemoteAddr = "10.0.0.9:4711"
	if want := referenceForwarded(hr, "10.0.0.9", "", false); got.String() != want {
		t.Errorf("forwarded header differs from net/http's (%d bytes, want %d)", got.Len(), len(want))
	}

	big := manyHeaders(1 << 20)
	buf := []byte(big)
	br := GetRequest()
	defer PutRequest(br)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := parseRequest(buf, br); err != nil {
			t.Errorf("parse the 1 MiB request: %v", err)
			return
		}
		CheckUpgrade(br)
		var h ForwardedHeader
		h.ForwardTo(br, "10.0.0.9", Client{})
		h.WriteTo(io.Discard)
	}()
	// Linear work is milliseconds, under -race too; quadratic was
	// minutes. The bound is far from both.
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("a 1 MiB request took more than 10 s: header handling is not linear")
	}
}

// BenchmarkHeaderSize reads, checks and forwards requests of 1 KiB to
// 1 MiB of headers: ns/byte must stay flat.
func BenchmarkHeaderSize(b *testing.B) {
	for _, size := range []int{1 << 10, 16 << 10, 128 << 10, 1 << 20} {
		raw := []byte(manyHeaders(size))
		buf := make([]byte, len(raw))
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			b.SetBytes(int64(len(raw)))
			b.ReportAllocs()
			for b.Loop() {
				r := GetRequest()
				copy(buf, raw)
				if err := parseRequest(buf, r); err != nil {
					b.Fatal(err)
				}
				CheckUpgrade(r)
				var h ForwardedHeader
				h.ForwardTo(r, "10.0.0.9", Client{})
				h.WriteTo(io.Discard)
				PutRequest(r)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(len(raw)), "ns/byte")
		})
	}
}
