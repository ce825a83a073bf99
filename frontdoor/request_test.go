package frontdoor

import (
	"bytes"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// readFrom feeds raw to ReadRequest over a pipe in chunks of step bytes
// and returns what it read.
func readFrom(t *testing.T, raw string, step, limit int) (*Request, []byte, error) {
	t.Helper()
	c, peer := net.Pipe()
	defer c.Close()
	go func() {
		defer peer.Close()
		for b := []byte(raw); len(b) > 0; {
			n := min(step, len(b))
			if _, err := peer.Write(b[:n]); err != nil {
				return
			}
			b = b[n:]
		}
	}()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	r := GetRequest()
	t.Cleanup(func() { PutRequest(r) })
	pending, err := ReadRequest(c, r, limit, 0, time.Time{})
	return r, bytes.Clone(pending), err
}

// TestRequestAsNetHTTP: the requests of forwardCases, read by
// ReadRequest in pieces of any size, give upstream the header lines that
// the same request parsed by net/http gives.
func TestRequestAsNetHTTP(t *testing.T) {
	for i, c := range forwardCases {
		for _, step := range []int{1, 3, 7, 4096} {
			r, pending, err := readFrom(t, c.request+"\x81\x85frame", step, 32<<10)
			if err != nil {
				t.Fatalf("%s, step %d: %v", c.name, step, err)
			}
			if string(pending) != "\x81\x85frame" && step == 4096 {
				t.Errorf("%s: pending %q, want the bytes after the head", c.name, pending)
			}
			r.RemoteAddr, r.TLS = "10.0.0.9:4711", c.tls
			var got, want strings.Builder
			var h ForwardedHeader
			h.ForwardTo(r, "10.0.0.9", Client{XFF: c.xff, TrustedPeer: c.trusted})
			h.WriteTo(&got)
			hr := parseForwardCase(t, i)
			h.ForwardTo(fromHTTP(hr), "10.0.0.9", Client{XFF: c.xff, TrustedPeer: c.trusted})
			h.WriteTo(&want)
			if got.String() != want.String() {
				t.Errorf("%s, step %d: got\n%s\nwant\n%s", c.name, step, got.String(), want.String())
			}
			if s1, m1 := CheckUpgrade(r); s1 != 0 {
				if s2, _ := CheckUpgrade(fromHTTP(hr)); s1 != s2 {
					t.Errorf("%s: CheckUpgrade %d %q, net/http's request %d", c.name, s1, m1, s2)
				}
			}
		}
	}
}

func TestReadRequestRefusals(t *testing.T) {
	const ok = "GET / HTTP/1.1\r\nHost: h\r\n"
	for _, c := range []struct {
		name, raw string
		want      error
	}{
		{"folded line", ok + "X-A: 1\r\n  2\r\n\r\n", ErrMalformed},
		{"space before colon", ok + "X-A : 1\r\n\r\n", ErrMalformed},
		{"no colon", ok + "X-A\r\n\r\n", ErrMalformed},
		{"control byte in value", ok + "X-A: a\x01b\r\n\r\n", ErrMalformed},
		{"two Hosts", ok + "Host: i\r\n\r\n", ErrMalformed},
		{"no Host", "GET / HTTP/1.1\r\nX: y\r\n\r\n", ErrMalformed},
		{"two Content-Lengths", ok + "Content-Length: 1\r\nContent-Length: 2\r\n\r\n", ErrMalformed},
		{"Content-Length not a number", ok + "Content-Length: -1\r\n\r\n", ErrMalformed},
		{"bad version", "GET / HTTP/x\r\nHost: h\r\n\r\n", ErrMalformed},
		{"HTTP/2.0", "GET / HTTP/2.0\r\nHost: h\r\n\r\n", ErrVersion},
		{"empty Content-Length", ok + "Content-Length:\r\n\r\n", ErrMalformed},
		{"empty second Content-Length", ok + "Content-Length: 0\r\nContent-Length: \r\n\r\n", ErrMalformed},
		{"Host not a host", "GET / HTTP/1.1\r\nHost: evil.com/x y<script>\r\n\r\n", ErrMalformed},
		{"two-word request line", "GET /\r\nHost: h\r\n\r\n", ErrMalformed},
		{"TLS hello", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", ErrMalformed},
		{"too large", ok + "X-Bomb: " + strings.Repeat("b", 40<<10) + "\r\n\r\n", ErrHeadTooLarge},
		{"cut short", ok + "X-A: 1\r\n", io.ErrUnexpectedEOF},
		{"nothing", "", io.EOF},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := readFrom(t, c.raw, 4096, 32<<10)
			if !errors.Is(err, c.want) {
				t.Errorf("err = %v, want %v", err, c.want)
			}
		})
	}
}

// TestReadRequestBody: what net/http counts as a body, CheckUpgrade
// refuses.
func TestReadRequestBody(t *testing.T) {
	for _, c := range []struct {
		header string
		body   bool
	}{
		{"Content-Length: 0", false},
		{"Content-Length: 000", false},
		{"Content-Length: 5", true},
		{"Transfer-Encoding: chunked", true},
		{"", false},
	} {
		raw := "GET / HTTP/1.1\r\nHost: h\r\n"
		if c.header != "" {
			raw += c.header + "\r\n"
		}
		r, _, err := readFrom(t, raw+"\r\n", 4096, 32<<10)
		if err != nil || r.hasBody != c.body {
			t.Errorf("%q: hasBody %v, %v; want %v", c.header, r.hasBody, err, c.body)
		}
	}
}

func BenchmarkParseRequest(b *testing.B) {
	raw := []byte(forwardCases[1].request)
	buf := make([]byte, len(raw))
	b.ReportAllocs()
	for b.Loop() {
		r := GetRequest()
		copy(buf, raw)
		if err := parseRequest(buf, r); err != nil {
			b.Fatal(err)
		}
		PutRequest(r)
	}
}
