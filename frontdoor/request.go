package frontdoor

// The client's upgrade request, read straight from the socket: no
// net/http, no header map, no bufio. The request line and header lines are
// read into one pooled buffer, checked as net/http checks them, and kept
// as one string that every field of the request is a piece of.

import (
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// HeadReadSize bounds one read of the request head. Whatever follows the
// head in the last read is the client's first frames (clientPending),
// which must fit the frame reader's buffer (frame: 32 KiB).
const HeadReadSize = 4096

// Errors of ReadRequest. The first three are answered; the others close
// the connection without a word, as net/http does.
var (
	ErrHeadTooLarge = errors.New("frontdoor: request header too large")
	ErrMalformed    = errors.New("frontdoor: malformed request")
	ErrVersion      = errors.New("frontdoor: unsupported HTTP version")
)

// field is one header line, its name canonical as net/http writes it.
type field struct{ name, value string }

// Request is a client's upgrade request. Its strings are pieces of Head:
// nothing refers to the read buffer, so a request may be kept after it.
type Request struct {
	Head         string // request line and header lines, as read
	method, uri  string
	major, minor int
	host         string
	URL          *url.URL
	fields       []field
	hasBody      bool   // Content-Length other than 0, or Transfer-Encoding
	RemoteAddr   string // the socket peer's host:port (the PROXY header's source)
	TLS          bool   // the connection is TLS

	buf []byte // the read buffer, HeadReadSize long, kept with the pooled request
}

// Values returns every value of the header name (canonical), as
// http.Header.Values does. It allocates: for the rare checks only.
func (r *Request) Values(name string) []string {
	var out []string
	for i := range r.fields {
		if r.fields[i].name == name {
			out = append(out, r.fields[i].value)
		}
	}
	return out
}

// One returns the only value of the header name and true, or false when
// there is none or more than one.
func (r *Request) One(name string) (string, bool) {
	v, n := "", 0
	for i := range r.fields {
		if r.fields[i].name == name {
			v, n = r.fields[i].value, n+1
		}
	}
	return v, n == 1
}

// Has reports whether the header name is present.
func (r *Request) Has(name string) bool {
	for i := range r.fields {
		if r.fields[i].name == name {
			return true
		}
	}
	return false
}

// HasToken reports whether any value of the header name lists token, as a
// comma-separated list, case-insensitively.
func (r *Request) HasToken(name, token string) bool {
	for i := range r.fields {
		if r.fields[i].name != name {
			continue
		}
		for t := range strings.SplitSeq(r.fields[i].value, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

var requestPool = sync.Pool{New: func() any {
	return &Request{fields: make([]field, 0, 16), buf: make([]byte, HeadReadSize)}
}}

func GetRequest() *Request { return requestPool.Get().(*Request) }

// PutRequest recycles r. Its strings stay valid: they are not in the
// read buffer; what ReadRequest returned as pending does not.
func PutRequest(r *Request) {
	clear(r.fields)
	*r = Request{fields: r.fields[:0], buf: r.buf}
	requestPool.Put(r)
}

// ReadRequest reads the request head from c into r, at most limit bytes
// of it, and returns the bytes read after it (the client's first frames,
// at most HeadReadSize), valid until PutRequest. A read error (timeout,
// EOF before the blank line) is returned as is. With idle > 0 each read
// that leaves the head unfinished gives the next one idle at most, and
// never past deadline: the caller set the first read's deadline.
func ReadRequest(c net.Conn, r *Request, limit int, idle time.Duration, deadline time.Time) (pending []byte, err error) {
	buf := r.buf
	n, scanned := 0, 0
	for {
		if n == len(buf) {
			if n >= limit {
				return nil, ErrHeadTooLarge
			}
			// A long head: rare, and not pooled.
			nb := make([]byte, min(2*len(buf), limit+HeadReadSize))
			copy(nb, buf[:n])
			buf = nb
		}
		m, rerr := c.Read(buf[n:min(len(buf), n+HeadReadSize)])
		n += m
		if end := headEnd(buf[:n], scanned); end > 0 {
			if end > limit {
				return nil, ErrHeadTooLarge
			}
			if err := parseRequest(buf[:end], r); err != nil {
				return nil, err
			}
			return buf[end:n], nil
		}
		if n > limit {
			return nil, ErrHeadTooLarge
		}
		// The blank line may straddle two reads: look again from 3 back.
		scanned = max(n-3, 0)
		if rerr == nil && idle > 0 {
			// A request must make progress, not only finish in time: a
			// client that stops sending gives its slot back soon.
			if next := time.Now().Add(idle); next.Before(deadline) {
				c.SetReadDeadline(next)
			} else {
				c.SetReadDeadline(deadline)
			}
		}
		if rerr != nil {
			if rerr == io.EOF && n > 0 {
				rerr = io.ErrUnexpectedEOF
			}
			return nil, rerr
		}
	}
}

// headEnd returns the length of the head in b, blank line included, or 0
// when it is not all there. Lines may end in LF alone, as net/http allows.
func headEnd(b []byte, from int) int {
	for i := from; i < len(b); i++ {
		if b[i] != '\n' {
			continue
		}
		switch {
		case i+1 < len(b) && b[i+1] == '\n':
			return i + 2
		case i+2 < len(b) && b[i+1] == '\r' && b[i+2] == '\n':
			return i + 3
		}
	}
	return 0
}

// parseRequest reads the head b (request line, header lines, blank line)
// into r, with net/http's checks: a method token, HTTP/x.y, header names
// that are tokens, values without control bytes, no line folding, one
// Host (required from HTTP/1.1) of bytes a host may hold, Content-Length
// a number, all copies equal; a major version other than 1 is ErrVersion
// (net/http's 505). An absolute-form target's host is the request's host,
// whatever Host says (RFC 9112 §3.2.2). Header names are made canonical
// in b first.
func parseRequest(b []byte, r *Request) error {
	// Canonical names in place, before the one copy to a string.
	for i, start := 0, 0; i < len(b); i++ {
		if b[i] != '\n' {
			continue
		}
		if start > 0 { // not the request line
			if colon := indexByte(b[start:i], ':'); colon > 0 {
				canonicalName(b[start : start+colon])
			}
		}
		start = i + 1
	}
	head := string(b)
	r.Head = head
	line, rest, _ := strings.Cut(head, "\n")
	line = strings.TrimSuffix(line, "\r")
	method, rl, ok1 := strings.Cut(line, " ")
	uri, proto, ok2 := strings.Cut(rl, " ")
	if !ok1 || !ok2 || !isToken(method, false) || uri == "" {
		return ErrMalformed
	}
	major, minor, ok := http.ParseHTTPVersion(proto)
	if !ok {
		return ErrMalformed
	}
	if major != 1 {
		return ErrVersion
	}
	r.method, r.uri, r.major, r.minor = method, uri, major, minor
	var contentLength string
	hosts, lengths := 0, 0
	for {
		line, rest, _ = strings.Cut(rest, "\n")
		line = strings.TrimSuffix(line, "\r")
		if line == "" {
			break
		}
		if line[0] == ' ' || line[0] == '\t' {
			return ErrMalformed // obsolete line folding (RFC 9112 §5.2)
		}
		name, value, ok := strings.Cut(line, ":")
		if !ok || !isToken(name, false) {
			return ErrMalformed
		}
		value = strings.Trim(value, " \t")
		if !validFieldValue(value) {
			return ErrMalformed
		}
		switch name {
		case "Host":
			hosts++
			r.host = value
		case "Content-Length":
			if lengths > 0 && contentLength != value {
				return ErrMalformed
			}
			contentLength = value
			lengths++
		case "Transfer-Encoding":
			r.hasBody = true
		}
		r.fields = append(r.fields, field{name, value})
	}
	if hosts > 1 || (hosts == 0 && r.minor >= 1) || !validHost(r.host) {
		return ErrMalformed
	}
	if lengths > 0 {
		if contentLength == "" {
			return ErrMalformed
		}
		for i := range len(contentLength) {
			if c := contentLength[i]; c < '0' || c > '9' {
				return ErrMalformed
			}
		}
		r.hasBody = r.hasBody || strings.TrimLeft(contentLength, "0") != ""
	}
	u, err := url.ParseRequestURI(uri)
	if err != nil {
		return ErrMalformed
	}
	r.URL = u
	if u.Host != "" {
		r.host = u.Host // absolute form wins over Host, as net/http reads it
	}
	return nil
}

// validHost is httpguts.ValidHostHeader, which net/http's server checks
// Host with: only bytes that a host, an IPv6 literal, a zone or a port
// may hold. It is lenient (it does not parse), but a Host such as
// "evil.com/x y<script>" never reaches the upstream's X-Forwarded-Host.
func validHost(h string) bool {
	for i := range len(h) {
		c := h[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
			strings.IndexByte("!$%&'()*+,-.:;=[]_~", c) >= 0) {
			return false
		}
	}
	return true
}

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}

// canonicalName rewrites a header name as textproto.CanonicalMIMEHeaderKey
// would: upper case first and after each '-', lower case elsewhere; a name
// that is not a token is left alone (and refused later).
func canonicalName(b []byte) {
	for _, c := range b {
		if !isTokenByte(c) {
			return
		}
	}
	upper := true
	for i, c := range b {
		switch {
		case upper && 'a' <= c && c <= 'z':
			b[i] = c - ('a' - 'A')
		case !upper && 'A' <= c && c <= 'Z':
			b[i] = c + ('a' - 'A')
		}
		upper = c == '-'
	}
}

func isTokenByte(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// validFieldValue is httpguts.ValidHeaderFieldValue: no control bytes but
// tab.
func validFieldValue(v string) bool {
	for i := range len(v) {
		if c := v[i]; c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

// RequestFromHTTP builds a request from one net/http has parsed, for
// ServeHTTP.
func RequestFromHTTP(hr *http.Request, r *Request) {
	r.method, r.uri, r.major, r.minor = hr.Method, hr.RequestURI, hr.ProtoMajor, hr.ProtoMinor
	r.host, r.URL, r.RemoteAddr, r.TLS = hr.Host, hr.URL, hr.RemoteAddr, hr.TLS != nil
	r.hasBody = hr.ContentLength > 0 || len(hr.TransferEncoding) > 0
	for name, vs := range hr.Header {
		for _, v := range vs {
			r.fields = append(r.fields, field{name, v})
		}
	}
}
