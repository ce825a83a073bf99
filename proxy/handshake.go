package proxy

import (
	"bufio"
	"context"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gobwas/httphead"
	"github.com/gobwas/ws"

	"sluice/frame"
	"sluice/limiter"
)

// maxRelayedBody bounds the body of an upstream rejection relayed to the
// client.
const maxRelayedBody = 64 << 10

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

// checkUpgrade validates the client's request before anything is dialled.
// It returns the HTTP status to answer with and a short reason.
func checkUpgrade(r *request) (int, string) {
	if !r.hasToken("Upgrade", "websocket") {
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
	if !r.hasToken("Connection", "upgrade") {
		return http.StatusBadRequest, "missing Connection: Upgrade"
	}
	if key, ok := r.one("Sec-Websocket-Key"); !ok || !validKey(key) {
		return http.StatusBadRequest, "missing or invalid Sec-WebSocket-Key"
	}
	if v, ok := r.one("Sec-Websocket-Version"); !ok || v != "13" {
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

// upstreamURL joins the request's path and query to the upstream URL the
// way net/http/httputil does.
func upstreamURL(base, req *url.URL) string {
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
func offers(r *request, policy limiter.Policy) (protocols []string, exts []httphead.Option) {
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

// extensionKind tells the frame checkers which RSV bits are legal.
func extensionKind(exts []httphead.Option) frame.Extension {
	kind := frame.NoExtension
	for _, e := range exts {
		if string(e.Name) != "permessage-deflate" {
			return frame.UnknownExtension
		}
		kind = frame.Deflate
	}
	return kind
}

// rejection is an upstream's non-101 answer, copied while the dialer's
// reader is still valid.
type rejection struct {
	status int
	header http.Header
	body   []byte
}

// droppedRejectionHeaders are the upstream answer's headers not passed on.
var droppedRejectionHeaders = append([]string{"Date", "Server"}, hopHeaders...)

func readRejection(status int, resp io.Reader) *rejection {
	rej := &rejection{status: status, header: http.Header{}}
	res, err := http.ReadResponse(bufio.NewReader(resp), nil)
	if err != nil {
		return rej
	}
	defer res.Body.Close()
	rej.header = res.Header
	for _, name := range droppedRejectionHeaders {
		rej.header.Del(name)
	}
	rej.body, _ = io.ReadAll(io.LimitReader(res.Body, maxRelayedBody))
	return rej
}

// dialFailure classifies an upstream dial error for the status it earns
// and the metric label.
func dialFailure(err error) (status int, reason string) {
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

// dialState is upgrade's state for the upstream dial. It is pooled, with
// the dialer's callbacks bound to it once, so that an upgrade allocates
// no closures and no header copy.
type dialState struct {
	s       *Server
	header  forwardedHeader
	rej     *rejection // the upstream's answer when it was not 101
	cookies []string   // the upstream's Set-Cookie values, for the 101

	netDial       func(ctx context.Context, network, addr string) (net.Conn, error)
	onStatusError func(status int, reason []byte, resp io.Reader)
	onHeader      func(k, v []byte) error
}

var dialStatePool = sync.Pool{New: func() any {
	u := new(dialState)
	u.netDial, u.onStatusError, u.onHeader = u.dial, u.statusError, u.headerLine
	return u
}}

func getDialState(s *Server) *dialState {
	u := dialStatePool.Get().(*dialState)
	u.s = s
	return u
}

func putDialState(u *dialState) {
	clear(u.cookies)
	u.s, u.header, u.rej, u.cookies = nil, forwardedHeader{}, nil, u.cookies[:0]
	dialStatePool.Put(u)
}

func (u *dialState) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := u.s.netDial(ctx, network, addr)
	if err == nil {
		u.s.lastUpstreamOK.Store(time.Now().UnixNano())
	}
	return c, err
}

func (u *dialState) statusError(status int, _ []byte, resp io.Reader) {
	u.rej = readRejection(status, resp)
}

func (u *dialState) headerLine(k, v []byte) error {
	if string(k) == "Set-Cookie" {
		u.cookies = append(u.cookies, string(v))
	}
	return nil
}
