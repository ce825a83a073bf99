package frontdoor

// Who a request comes from, and what sluice tells the upstream of it: the
// client address as trusted proxies report it (X-Forwarded-For, RFC 7239
// Forwarded), and the forwarding headers sluice writes upstream.

import (
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/textproto"
	"slices"
	"strings"
)

// Client is who an upgrade request comes from, as admission control, the
// logs and the status page see it.
type Client struct {
	// Addr is the socket peer's host:port, or, when a trusted proxy
	// forwarded the request, the client IP that its headers give.
	Addr string
	// XFF, when not empty, is the X-Forwarded-For to send upstream in
	// place of the one ForwardedHeader builds: the received list up to
	// and including the client found in it. Either way its last entry is
	// the client that sluice admitted.
	XFF string
	// TrustedPeer: the socket peer is within Options.TrustedProxies, so
	// its Forwarded and X-Real-IP go upstream; from any other peer they
	// are the client's own say and are removed.
	TrustedPeer bool
}

// headerValues is a request's header as ResolveClient reads it (an
// http.Header, or a request).
type headerValues interface{ Values(name string) []string }

// ResolveClient finds the client of a request from remoteAddr with header
// h. Only a peer within trusted is believed about who it forwards for:
// walking X-Forwarded-For and the for= parameters of Forwarded (RFC 7239)
// from the right, the first address that is not a trusted proxy is the
// client. Entries left of it are the client's own say and are never
// believed. A hop that does not parse stops the walk: the nearest trusted
// hop is then the client, since nothing beyond it can be vouched for; the
// same when every hop is trusted.
//
// Neither header takes precedence: a proxy that appends to one passes the
// other on as the client wrote it, so believing either one over the
// other lets a client choose its address. When both name a client and
// the two differ, neither is believed and the client is the peer itself;
// when only one names a client (the other is absent or unreadable), that
// one is. X-Real-IP is never read: it has no chain to walk.
func ResolveClient(trusted []netip.Prefix, remoteAddr string, h headerValues) Client {
	cl := Client{Addr: remoteAddr}
	if len(trusted) == 0 {
		return cl
	}
	peer, err := netip.ParseAddrPort(remoteAddr)
	if err != nil || !TrustedAddr(trusted, peer.Addr().Unmap()) {
		return cl
	}
	cl.TrustedPeer = true
	var hops []string
	xffIP, i := netip.Addr{}, -1
	if xff := h.Values("X-Forwarded-For"); len(xff) > 0 {
		hops = splitXFF(xff)
		xffIP, i = walkHops(trusted, hops)
	}
	fwdIP, j := netip.Addr{}, -1
	if fwd := h.Values("Forwarded"); len(fwd) > 0 {
		fwdIP, j = walkHops(trusted, forwardedFor(fwd))
	}
	switch {
	case i >= 0 && j >= 0 && xffIP != fwdIP:
		// They disagree: one of them is the client's own say.
	case i >= 0:
		cl.Addr = xffIP.String()
		cl.XFF = strings.Join(append(hops[:i:i], cl.Addr), ", ")
	case j >= 0:
		cl.Addr = fwdIP.String()
		cl.XFF = cl.Addr
	}
	return cl
}

// walkHops returns the client in hops, a forwarding list whose last entry
// a trusted peer appended, and its index; -1 when the peer itself is the
// nearest hop that can be vouched for.
func walkHops(trusted []netip.Prefix, hops []string) (netip.Addr, int) {
	var last netip.Addr
	at := -1
	for i := len(hops) - 1; i >= 0; i-- {
		ip, ok := parseHopAddr(hops[i])
		if !ok {
			break
		}
		last, at = ip, i
		if !TrustedAddr(trusted, ip) {
			break
		}
	}
	return last, at
}

func TrustedAddr(trusted []netip.Prefix, ip netip.Addr) bool {
	for _, p := range trusted {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// splitXFF lists the entries of X-Forwarded-For fields, oldest first,
// without the empty ones.
func splitXFF(values []string) []string {
	var hops []string
	for _, v := range values {
		for e := range strings.SplitSeq(v, ",") {
			if e = strings.Trim(e, " \t"); e != "" {
				hops = append(hops, e)
			}
		}
	}
	return hops
}

// parseHopAddr reads one hop: an IP address, possibly in brackets or with
// a port (1.2.3.4, 1.2.3.4:80, 2001:db8::1, [2001:db8::1]:80). Zones and
// anything else (unknown, obfuscated identifiers) do not parse.
func parseHopAddr(s string) (netip.Addr, bool) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		if ap, perr := netip.ParseAddrPort(s); perr == nil {
			a, err = ap.Addr(), nil
		} else if len(s) > 2 && s[0] == '[' && s[len(s)-1] == ']' {
			a, err = netip.ParseAddr(s[1 : len(s)-1])
		}
	}
	if err != nil || a.Zone() != "" {
		return netip.Addr{}, false
	}
	return a.Unmap(), true
}

// forwardedFor returns the for= value of each element of Forwarded fields
// (RFC 7239 §4), oldest first and unquoted: "" for an element that has
// none or does not parse, so that the walk stops there. Empty elements are
// skipped. Unquoted IPv6 literals, which senders emit despite the RFC, are
// accepted.
func forwardedFor(values []string) []string {
	var out []string
	for _, v := range values {
		elems, closed := splitUnquoted(v, ',')
		for i, e := range elems {
			if e = strings.Trim(e, " \t"); e == "" {
				continue
			}
			f, ok := forParam(e)
			if !ok || (!closed && i == len(elems)-1) {
				f = ""
			}
			out = append(out, f)
		}
	}
	return out
}

// forParam reads the for= parameter of one Forwarded element.
func forParam(elem string) (string, bool) {
	pairs, closed := splitUnquoted(elem, ';')
	if !closed {
		return "", false
	}
	val, seen := "", false
	for _, p := range pairs {
		if p = strings.Trim(p, " \t"); p == "" {
			continue
		}
		name, v, found := strings.Cut(p, "=")
		if !found || !isToken(name, false) {
			return "", false
		}
		if strings.HasPrefix(v, `"`) {
			var ok bool
			if v, ok = unquote(v); !ok {
				return "", false
			}
		} else if !isToken(v, true) {
			return "", false
		}
		if strings.EqualFold(name, "for") {
			if seen {
				return "", false
			}
			val, seen = v, true
		}
	}
	return val, true
}

// splitUnquoted splits s at sep outside quoted-strings; closed is false
// when the last quoted-string is not terminated.
func splitUnquoted(s string, sep byte) (parts []string, closed bool) {
	start, quoted := 0, false
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case quoted && c == '\\':
			i++
		case c == '"':
			quoted = !quoted
		case !quoted && c == sep:
			parts = append(parts, s[start:i])
			start = i + 1
		}
	}
	return append(parts, s[start:]), !quoted
}

// unquote decodes a quoted-string that is the whole of s.
func unquote(s string) (string, bool) {
	if len(s) < 2 || s[0] != '"' || s[len(s)-1] != '"' {
		return "", false
	}
	var b strings.Builder
	for i := 1; i < len(s)-1; i++ {
		c := s[i]
		switch {
		case c == '\\' && i+1 < len(s)-1:
			i++
			b.WriteByte(s[i])
		case c == '\\' || c == '"':
			return "", false
		default:
			b.WriteByte(c)
		}
	}
	return b.String(), true
}

// isToken reports whether s is a non-empty RFC 9110 token; hop also lets
// through ':', '[' and ']' for unquoted IPv6 literals.
func isToken(s string, hop bool) bool {
	if s == "" {
		return false
	}
	for i := range len(s) {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		case hop && (c == ':' || c == '[' || c == ']'):
		default:
			return false
		}
	}
	return true
}

// ClientKey is what MaxConnectionsPerIP counts by for a client address
// (Client.Addr): the IPv4 address, or the /64 of an IPv6 address, since
// one IPv6 host commonly holds a whole /64. It is the zero Addr (not
// counted) when addr holds no IP, as with Unix sockets.
func ClientKey(addr string) netip.Addr {
	var ip netip.Addr
	if ap, err := netip.ParseAddrPort(addr); err == nil {
		ip = ap.Addr()
	} else if a, err := netip.ParseAddr(addr); err == nil {
		ip = a
	} else {
		return netip.Addr{}
	}
	ip = ip.Unmap().WithZone("")
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return p.Addr()
	}
	return ip
}

// ParseTrustedProxy reads one entry of Options.TrustedProxies as the
// configuration writes it: a CIDR (10.0.0.0/8, fd00::/8) or a single
// address (10.1.2.3, which means 10.1.2.3/32).
func ParseTrustedProxy(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil || p.Addr().Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("%q is not a CIDR such as 10.0.0.0/8 or fd00::/8", s)
		}
		return NormalizePrefix(p), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("%q is not an IP address or a CIDR", s)
	}
	return NormalizePrefix(netip.PrefixFrom(a, a.BitLen())), nil
}

// NormalizePrefix masks p and writes IPv4-mapped prefixes as IPv4, since
// addresses are unmapped before they are looked up.
func NormalizePrefix(p netip.Prefix) netip.Prefix {
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p.Masked()
}

// ForwardedHeader is the upstream request's end-to-end headers: the
// client's, less hop-by-hop ones and identity headers the client may not
// set, plus X-Forwarded-*. It writes them straight from the client's
// request, in the order http.Header.Write would (sorted by name, the same
// clean-up of values), rather than build a copy of the header for every
// upgrade.
type ForwardedHeader struct {
	req         *Request
	xff         string // X-Forwarded-For
	proto       string // X-Forwarded-Proto
	host        string // X-Forwarded-Host
	trustedPeer bool   // client.trustedPeer
	// listed is the names the client's Connection header lists, read
	// once: looked up once per field, so that the work stays linear in
	// the request's size (6,000 tokens by 1,800 fields was 150 ms of CPU
	// when every field walked every token).
	listed connectionList
}

// connectionList is a set of the tokens of Connection fields. A few
// tokens (the usual "Upgrade" or "keep-alive, Upgrade") are kept in place
// and compared without allocating; past smallList they go in a map by
// canonical name, which the parser has given every field name.
type connectionList struct {
	small [smallList]string
	n     int
	big   map[string]struct{}
}

const smallList = 8

func (c *connectionList) add(token string) {
	if c.big == nil && c.n < len(c.small) {
		c.small[c.n] = token
		c.n++
		return
	}
	if c.big == nil {
		c.big = make(map[string]struct{}, 2*len(c.small))
		for _, t := range c.small[:c.n] {
			c.big[textproto.CanonicalMIMEHeaderKey(t)] = struct{}{}
		}
	}
	c.big[textproto.CanonicalMIMEHeaderKey(token)] = struct{}{}
}

// Has reports whether name, canonical, is listed.
func (c *connectionList) has(name string) bool {
	if c.big != nil {
		_, ok := c.big[name]
		return ok
	}
	for _, t := range c.small[:c.n] {
		if strings.EqualFold(t, name) {
			return true
		}
	}
	return false
}

// ForwardTo fills h for r from clientIP, admitted as cl: cl.XFF, when not
// empty, is the X-Forwarded-For to send instead of the received list
// plus clientIP.
func (h *ForwardedHeader) ForwardTo(r *Request, clientIP string, cl Client) {
	xff := cl.XFF
	if xff == "" {
		xff = clientIP
		if r.Has("X-Forwarded-For") {
			xff = strings.Join(r.Values("X-Forwarded-For"), ", ") + ", " + clientIP
		}
	}
	h.req, h.xff, h.proto, h.host, h.trustedPeer = r, xff, "http", r.host, cl.TrustedPeer
	if r.TLS {
		h.proto = "https"
	}
	h.listed = connectionList{}
	for _, f := range r.fields {
		if f.name != "Connection" {
			continue
		}
		for listed := range strings.SplitSeq(f.value, ",") {
			if listed = textproto.TrimString(listed); listed != "" {
				h.listed.add(listed)
			}
		}
	}
}

// forwarded reports whether the client's header name goes upstream.
func (h *ForwardedHeader) forwarded(name string) bool {
	switch identityHeader(name) {
	case identityOurs, identityAlias:
		return false // sluice's own values replace them
	case identityPeer:
		if !h.trustedPeer {
			return false
		}
	}
	for _, hop := range hopHeaders {
		if name == hop {
			return false
		}
	}
	if h.listed.has(name) {
		return false
	}
	return isToken(name, false) // as http.Header.Write, drop what is not a field name
}

// Rewrite makes out, a copy of the request's header that net/http
// parsed (a pass-through request), what an upgrade would send upstream:
// the fields ForwardedHeader would not forward removed, sluice's
// X-Forwarded-For, -Host and -Proto set. Te stays, as
// httputil.ReverseProxy keeps it for gRPC.
func (h *ForwardedHeader) Rewrite(out http.Header) {
	for name := range out {
		if name != "Te" && !h.forwarded(name) {
			delete(out, name)
		}
	}
	out.Set("X-Forwarded-For", h.xff)
	out.Set("X-Forwarded-Host", h.host)
	out.Set("X-Forwarded-Proto", h.proto)
}

// Kinds of header names that say who the client is.
const (
	identityNone  = iota
	identityOurs  // X-Forwarded-For, -Host, -Proto: sluice writes its own
	identityPeer  // Forwarded, X-Real-IP: kept from trusted proxies only
	identityAlias // any other spelling of those (X_Forwarded_For): never forwarded
)

// identityHeader classifies a canonical header name. Backends that read
// headers through CGI-style names (HTTP_X_FORWARDED_FOR) or fold case
// and '_' to '-' read an alias as the real header, so an alias is never
// passed on, whoever sent it.
func identityHeader(name string) int {
	switch name {
	case "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto":
		return identityOurs
	case "Forwarded", "X-Real-Ip":
		return identityPeer
	}
	if len(name) < len("Forwarded") || len(name) > len("X-Forwarded-Proto") || strings.IndexByte(name, '_') < 0 {
		return identityNone
	}
	var b [len("X-Forwarded-Proto")]byte
	for i := range len(name) {
		c := name[i] | 0x20
		if name[i] == '_' {
			c = '-'
		}
		b[i] = c
	}
	switch string(b[:len(name)]) {
	case "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "forwarded", "x-real-ip":
		return identityAlias
	}
	return identityNone
}

// Stand-ins for sluice's own fields in WriteTo's list of field indexes.
const (
	fieldXFF = -1 - iota
	fieldXFHost
	fieldXFProto
)

// WriteTo implements ws.HandshakeHeader.
func (h *ForwardedHeader) WriteTo(w io.Writer) (int64, error) {
	ws, ok := w.(io.StringWriter)
	if !ok {
		ws = stringWriter{w}
	}
	fields := h.req.fields
	name := func(i int) string {
		switch i {
		case fieldXFF:
			return "X-Forwarded-For"
		case fieldXFHost:
			return "X-Forwarded-Host"
		case fieldXFProto:
			return "X-Forwarded-Proto"
		}
		return fields[i].name
	}
	var buf [32]int // indexes on the stack for the usual request
	order := append(buf[:0], fieldXFF, fieldXFHost, fieldXFProto)
	for i := range fields {
		if h.forwarded(fields[i].name) {
			order = append(order, i)
		}
	}
	// Stable: the values of one name keep their order, as in an
	// http.Header.
	slices.SortStableFunc(order, func(a, b int) int { return strings.Compare(name(a), name(b)) })
	var n int64
	for _, i := range order {
		var v string
		switch i {
		case fieldXFF:
			v = h.xff
		case fieldXFHost:
			v = h.host
		case fieldXFProto:
			v = h.proto
		default:
			v = fields[i].value
		}
		if strings.ContainsAny(v, "\r\n") {
			v = headerNewlineToSpace.Replace(v)
		}
		v = textproto.TrimString(v)
		for _, s := range [...]string{name(i), ": ", v, "\r\n"} {
			m, err := ws.WriteString(s)
			n += int64(m)
			if err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

var headerNewlineToSpace = strings.NewReplacer("\n", " ", "\r", " ")

type stringWriter struct{ w io.Writer }

func (w stringWriter) WriteString(s string) (int, error) { return w.w.Write([]byte(s)) }
