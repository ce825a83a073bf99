package frontdoor

import (
	"io"
	"net/http"
	"strings"
	"testing"
)

// FuzzReadRejection: whatever the upstream answers, what is relayed is a
// final status with header fields net/http would write and a bounded
// body, or a 502.
func FuzzReadRejection(f *testing.F) {
	for _, s := range []string{
		"HTTP/1.1 403 Forbidden\r\nConnection: X-A\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nno",
		"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n",
		"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n\r\n",
		"HTTP/1.1 403 Forbidden\r\nX-A: a\rb\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, answer []byte) {
		lim := &io.LimitedReader{R: strings.NewReader(string(answer)), N: maxUpstreamHead}
		rej := ReadRejection(lim, func(n int64) { lim.N += n })
		if rej.bad {
			if rej.status != http.StatusBadGateway {
				t.Fatalf("bad answer relayed as %d", rej.status)
			}
			return
		}
		if rej.status < 200 || rej.status > 999 {
			t.Fatalf("status %d relayed", rej.status)
		}
		if len(rej.body) > maxRelayedBody {
			t.Fatalf("body of %d bytes", len(rej.body))
		}
		for name, vs := range rej.header {
			if !isToken(name, false) {
				t.Fatalf("field name %q", name)
			}
			for _, v := range vs {
				if !validFieldValue(v) {
					t.Fatalf("%s: %q", name, v)
				}
			}
		}
		if len(rej.header["Connection"]) > 0 {
			t.Fatalf("Connection relayed: %q", rej.header["Connection"])
		}
	})
}
