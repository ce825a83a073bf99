package frontdoor

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gobwas/httphead"
	"github.com/gobwas/ws"

	"github.com/sluice-proxy/sluice/frame"
	"github.com/sluice-proxy/sluice/limiter"
)

// maxRelayedBody bounds the body of an upstream rejection relayed to the
// client.
const maxRelayedBody = 64 << 10

// maxUpstreamHead bounds what sluice reads of the upstream's answer before
// its body or its first frames: status lines (interim answers included)
// and header lines. Past it the client gets 502. gobwas/ws reads a header
// line whole, however long (an 8 MiB line was relayed), so the bound is
// on the socket reads themselves (headLimit).
const maxUpstreamHead = 64 << 10

// Errors of the upstream's answer, each a 502 to the client.
var (
	ErrUpstreamHeadTooLarge = errors.New("frontdoor: upstream answer header too large")
	ErrUpstreamBadHeader    = errors.New("frontdoor: upstream answer header malformed")
)

// hopHeaders are meaningful for one connection only and never forwarded
// (RFC 9110 §7.6.1), with the WebSocket handshake headers that the dialer
// and the upgrader write themselves.
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
	"Host", "Content-Length",
	"Sec-Websocket-Key", "Sec-Websocket-Version", "Sec-Websocket-Accept",
	"Sec-Websocket-Protocol", "Sec-Websocket-Extensions",
}

// CheckUpgrade validates the client's request before anything is dialled.
// It returns the HTTP status to answer with and a short reason.
func CheckUpgrade(r *Request) (int, string) {
	if !r.HasToken("Upgrade", "websocket") {
		return http.StatusUpgradeRequired, "this is a WebSocket endpoint: send an Upgrade: websocket request"
	}
	if r.method != http.MethodGet {
		return http.StatusMethodNotAllowed, "WebSocket upgrades must use GET"
	}
	if r.major < 1 || r.major == 1 && r.minor < 1 {
		return http.StatusBadRequest, "WebSocket upgrades need HTTP/1.1"
	}
	if r.hasBody {
		// After the 101 those bytes would be read as frames, while an HTTP
		// device in front saw them as a body: a smuggling surface.
		return http.StatusBadRequest, "an upgrade request has no body"
	}
	if r.host == "" {
		return http.StatusBadRequest, "missing Host"
	}
	if !r.HasToken("Connection", "upgrade") {
		return http.StatusBadRequest, "missing Connection: Upgrade"
	}
	if key, ok := r.One("Sec-Websocket-Key"); !ok || !validKey(key) {
		return http.StatusBadRequest, "missing or invalid Sec-WebSocket-Key"
	}
	if v, ok := r.One("Sec-Websocket-Version"); !ok || v != "13" {
		return http.StatusUpgradeRequired, "unsupported Sec-WebSocket-Version: want 13"
	}
	return 0, ""
}

// validKey reports whether k is base64 for 16 bytes: 24 characters, since
// the request parser has already refused the CR and LF that the decoder
// would skip. Decoded on the stack: it runs for every upgrade.
func validKey(k string) bool {
	if len(k) != 24 {
		return false
	}
	var b [18]byte
	n, err := base64.StdEncoding.Decode(b[:], []byte(k))
	return err == nil && n == 16
}

// UpstreamURL joins the request's path and query to the upstream URL the
// way net/http/httputil does.
func UpstreamURL(base, req *url.URL) string {
	u := *base
	u.Path, u.RawPath = joinURLPath(base, req)
	switch {
	case base.RawQuery == "":
		u.RawQuery = req.RawQuery
	case req.RawQuery != "":
		u.RawQuery = base.RawQuery + "&" + req.RawQuery
	}
	u.Fragment = ""
	return u.String()
}

func joinURLPath(a, b *url.URL) (path, rawpath string) {
	if a.RawPath == "" && b.RawPath == "" {
		return singleJoiningSlash(a.Path, b.Path), ""
	}
	apath, bpath := a.EscapedPath(), b.EscapedPath()
	aslash, bslash := strings.HasSuffix(apath, "/"), strings.HasPrefix(bpath, "/")
	switch {
	case aslash && bslash:
		return a.Path + b.Path[1:], apath + bpath[1:]
	case !aslash && !bslash:
		return a.Path + "/" + b.Path, apath + "/" + bpath
	}
	return a.Path + b.Path, apath + bpath
}

func singleJoiningSlash(a, b string) string {
	aslash, bslash := strings.HasSuffix(a, "/"), strings.HasPrefix(b, "/")
	switch {
	case aslash && bslash:
		return a + b[1:]
	case !aslash && !bslash:
		return a + "/" + b
	}
	return a + b
}

// offers reads the client's subprotocol and extension offers. Under the
// Drop policy a permessage-deflate offer also asks the server for
// server_no_context_takeover, so every server message decompresses on its
// own and dropping one cannot corrupt the next (RFC 7692 §7.1.1.1).
func Offers(r *Request, policy limiter.Policy) (protocols []string, exts []httphead.Option) {
	for _, f := range r.fields {
		switch f.name {
		case "Sec-Websocket-Protocol":
			httphead.ScanTokens([]byte(f.value), func(tok []byte) bool {
				protocols = append(protocols, string(tok))
				return true
			})
		case "Sec-Websocket-Extensions":
			exts, _ = httphead.ParseOptions([]byte(f.value), exts)
		}
	}
	if policy == limiter.Drop {
		for i := range exts {
			if string(exts[i].Name) == "permessage-deflate" {
				if _, ok := exts[i].Parameters.Get("server_no_context_takeover"); !ok {
					exts[i].Parameters.Set([]byte("server_no_context_takeover"), nil)
				}
			}
		}
	}
	return protocols, exts
}

// ExtensionKind tells the frame checkers which RSV bits are legal.
func ExtensionKind(exts []httphead.Option) frame.Extension {
	kind := frame.NoExtension
	for _, e := range exts {
		if string(e.Name) != "permessage-deflate" {
			return frame.UnknownExtension
		}
		kind = frame.Deflate
	}
	return kind
}

// Rejection is an upstream's non-101 answer, copied while the dialer's
// reader is still valid. bad says the answer could not be relayed (too
// large, malformed, or a 101 after an interim answer): the client gets 502.
type Rejection struct {
	status int
	header http.Header
	body   []byte
	bad    bool
}

// Bad reports that the answer is one sluice will not relay: too large or
// malformed.
func (rej *Rejection) Bad() bool { return rej.bad }

// droppedRejectionHeaders are the upstream answer's headers not passed on.
var droppedRejectionHeaders = append([]string{"Date", "Server"}, hopHeaders...)

// ReadRejection reads the upstream's answer from resp, which starts at
// its status line: interim 1xx answers (100 Continue, 103 Early Hints)
// are skipped, as net/http's client skips them, and the final answer is
// kept with its header cleaned (hop-by-hop fields, those its Connection
// lists, and any field net/http would refuse to write) and its body
// bounded. more lets the body past the head bound.
func ReadRejection(resp io.Reader, more func(int64)) *Rejection {
	bad := &Rejection{status: http.StatusBadGateway, bad: true}
	br := bufio.NewReader(resp)
	var res *http.Response
	var listed []string
	for {
		// The head is read first for its Connection field, which
		// http.ReadResponse removes when it says close.
		head, err := readHead(br)
		if err != nil {
			return bad
		}
		tp := textproto.NewReader(bufio.NewReader(bytes.NewReader(head)))
		tp.ReadLine()
		mh, err := tp.ReadMIMEHeader()
		if err != nil {
			return bad
		}
		listed = mh["Connection"]
		if res, err = http.ReadResponse(bufio.NewReader(io.MultiReader(bytes.NewReader(head), br)), nil); err != nil {
			return bad
		}
		if res.StatusCode >= 200 {
			break
		}
		if res.StatusCode == http.StatusSwitchingProtocols {
			// Too late: the dialer has given up on this connection.
			return bad
		}
	}
	defer res.Body.Close()
	rej := &Rejection{status: res.StatusCode, header: res.Header}
	for name, vs := range rej.header {
		if !isToken(name, false) {
			return bad
		}
		for _, v := range vs {
			if !validFieldValue(v) {
				return bad
			}
		}
	}
	for _, v := range listed {
		for name := range strings.SplitSeq(v, ",") {
			if name = textproto.TrimString(name); name != "" {
				rej.header.Del(name)
			}
		}
	}
	for _, name := range droppedRejectionHeaders {
		rej.header.Del(name)
	}
	more(maxRelayedBody)
	rej.body, _ = io.ReadAll(io.LimitReader(res.Body, maxRelayedBody))
	return rej
}

// readHead reads a status line and header lines, through the blank line.
func readHead(br *bufio.Reader) ([]byte, error) {
	var head []byte
	whole := true // the slice read starts a line
	for {
		line, err := br.ReadSlice('\n')
		head = append(head, line...)
		switch {
		case err == bufio.ErrBufferFull:
			whole = false
			continue
		case err != nil:
			return nil, err
		case whole && len(head) > len(line) && (string(line) == "\n" || string(line) == "\r\n"):
			return head, nil
		}
		whole = true
	}
}

// headLimit is the upstream connection as the dialer reads the answer
// through it: reads end with ErrUpstreamHeadTooLarge past left bytes.
// Once the handshake is done the session reads the connection itself.
type headLimit struct {
	conn net.Conn
	left int64
}

func (h *headLimit) Read(p []byte) (int, error) {
	if h.left <= 0 {
		return 0, ErrUpstreamHeadTooLarge
	}
	if int64(len(p)) > h.left {
		p = p[:h.left]
	}
	n, err := h.conn.Read(p)
	h.left -= int64(n)
	return n, err
}

func (h *headLimit) Write(p []byte) (int, error) { return h.conn.Write(p) }

// DialFailure classifies an upstream dial error for the status it earns
// and the metric label.
func DialFailure(err error) (status int, reason string) {
	var ne net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return http.StatusGatewayTimeout, "timeout"
	case errors.Is(err, syscall.ECONNREFUSED):
		return http.StatusBadGateway, "refused"
	case errors.Is(err, context.Canceled):
		return 499, "client_gone"
	}
	var se ws.StatusError
	if errors.As(err, &se) {
		return int(se), "status"
	}
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Op == "dial" {
		return http.StatusBadGateway, "unreachable"
	}
	return http.StatusBadGateway, "handshake"
}

// UpstreamDialer is what every upgrade's dial toward the backend shares.
type UpstreamDialer struct {
	Timeout time.Duration // connect and handshake
	Host    string        // the Host sent upstream: the upstream URL's
	TLS     *tls.Config   // for wss://; nil: the system roots
	// Policy is the client queue's: with limiter.Drop, a deflate offer
	// asks for server_no_context_takeover (Offers).
	Policy  limiter.Policy
	NetDial func(ctx context.Context, network, addr string) (net.Conn, error)
	// LastConnect is set to the unix nanotime of each successful TCP
	// connect, for readiness.
	LastConnect *atomic.Int64
}

// DialState is an upgrade's state for the upstream dial. It is pooled,
// with the dialer's callbacks bound to it once, so that an upgrade
// allocates no closures and no header copy.
type DialState struct {
	d       *UpstreamDialer
	header  ForwardedHeader
	rej     *Rejection // the upstream's answer when it was not 101
	cookies []string   // the upstream's Set-Cookie values, for the 101
	head    headLimit  // the upstream connection, as the dialer reads it

	netDial       func(ctx context.Context, network, addr string) (net.Conn, error)
	onStatusError func(status int, reason []byte, resp io.Reader)
	onHeader      func(k, v []byte) error
}

var dialStatePool = sync.Pool{New: func() any {
	u := new(DialState)
	u.netDial, u.onStatusError, u.onHeader = u.dial, u.statusError, u.headerLine
	return u
}}

// GetDialState returns a pooled DialState dialing with d; PutDialState
// gives it back once its Cookies are written.
func GetDialState(d *UpstreamDialer) *DialState {
	u := dialStatePool.Get().(*DialState)
	u.d = d
	return u
}

// PutDialState recycles u.
func PutDialState(u *DialState) {
	clear(u.cookies)
	u.d, u.header, u.rej, u.cookies, u.head = nil, ForwardedHeader{}, nil, u.cookies[:0], headLimit{}
	dialStatePool.Put(u)
}

// Rejection is the upstream's answer when it was not 101, or nil.
func (u *DialState) Rejection() *Rejection { return u.rej }

// Cookies are the upstream's Set-Cookie values, for the client's 101;
// valid until PutDialState.
func (u *DialState) Cookies() []string { return u.cookies }

// Dial upgrades a connection to target, the backend's URL for r, on
// behalf of r's client cl: r's header goes upstream cleaned and with
// X-Forwarded-* (ForwardedHeader), its subprotocols and extensions
// offered. Bounded by the dialer's timeout alone, with no goroutine per
// dial to watch a context: a client gone meanwhile is noticed when its
// 101 cannot be written.
func (u *DialState) Dial(r *Request, cl Client, target string) (net.Conn, *bufio.Reader, ws.Handshake, error) {
	clientIP, _, _ := net.SplitHostPort(r.RemoteAddr)
	u.header.ForwardTo(r, clientIP, cl)
	protocols, exts := Offers(r, u.d.Policy)
	dialer := ws.Dialer{
		Timeout:       u.d.Timeout,
		Protocols:     protocols,
		Extensions:    exts,
		Header:        &u.header,
		Host:          u.d.Host,
		TLSConfig:     u.d.TLS,
		NetDial:       u.netDial,
		OnStatusError: u.onStatusError,
		OnHeader:      u.onHeader,
	}
	return u.dialUpstream(&dialer, target)
}

// dialUpstream connects to target and upgrades the connection as
// ws.Dialer.Dial does, but reads the answer through u.head, so that it is
// bounded. Within d.Timeout.
func (u *DialState) dialUpstream(d *ws.Dialer, target string) (net.Conn, *bufio.Reader, ws.Handshake, error) {
	var hs ws.Handshake
	tu, err := url.ParseRequestURI(target)
	if err != nil {
		return nil, nil, hs, err
	}
	deadline := time.Now().Add(d.Timeout)
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	var conn net.Conn
	switch tu.Scheme {
	case "ws":
		conn, err = u.dial(ctx, "tcp", hostPort(tu, "80"))
	case "wss":
		if conn, err = u.dial(ctx, "tcp", hostPort(tu, "443")); err == nil {
			cfg := d.TLSConfig
			if cfg == nil {
				cfg = &tls.Config{}
			}
			if cfg.ServerName == "" {
				cfg = cfg.Clone()
				cfg.ServerName = tu.Hostname()
			}
			conn = tls.Client(conn, cfg)
		}
	default:
		err = errors.New("frontdoor: upstream scheme must be ws or wss")
	}
	if err != nil {
		return nil, nil, hs, err
	}
	conn.SetDeadline(deadline)
	u.head = headLimit{conn: conn, left: maxUpstreamHead + ws.DefaultClientReadBufferSize}
	br, hs, err := d.Upgrade(&u.head, tu)
	u.head.conn = nil
	if err != nil {
		conn.Close()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = context.DeadlineExceeded
		}
		return nil, nil, hs, err
	}
	conn.SetDeadline(time.Time{})
	return conn, br, hs, nil
}

// hostPort is u's host:port, with the scheme's port when it has none.
func hostPort(u *url.URL, port string) string {
	if p := u.Port(); p != "" {
		port = p
	}
	return net.JoinHostPort(u.Hostname(), port)
}

func (u *DialState) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := u.d.NetDial(ctx, network, addr)
	if err == nil && u.d.LastConnect != nil {
		u.d.LastConnect.Store(time.Now().UnixNano())
	}
	return c, err
}

func (u *DialState) statusError(_ int, _ []byte, resp io.Reader) {
	u.rej = ReadRejection(resp, u.moreHead)
}

func (u *DialState) moreHead(n int64) { u.head.left += n }

// headerLine sees the 101's header lines but the handshake's own: a
// value with a control byte (a bare CR, a NUL) fails the upgrade, with
// 502, rather than reach the client.
func (u *DialState) headerLine(k, v []byte) error {
	if !isToken(string(k), false) || !validFieldValue(string(v)) {
		return ErrUpstreamBadHeader
	}
	if string(k) == "Set-Cookie" {
		u.cookies = append(u.cookies, string(v))
	}
	return nil
}
