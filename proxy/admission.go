package proxy

// Admission control: who may open a session, how many at once and how
// fast, decided in ServeHTTP before anything is dialled; and the frame read
// timeout, which bounds how long a client may take to send one frame once
// it has started.
//
// ServeHTTP checks, in this order, after the request has been found to be
// a WebSocket upgrade and sluice is not draining:
//
//  1. Origin: with Options.AllowedOrigins set, a request whose Origin
//     header matches no entry gets 403. A request without Origin (not a
//     browser) passes: cross-site WebSocket hijacking needs a browser, and
//     browsers always send Origin with a WebSocket handshake.
//  2. Options.MaxConnections: 503 with Retry-After.
//  3. Options.MaxConnectionsPerIP: 429 with Retry-After.
//  4. Options.MaxHandshakesPerSecond: 503 with Retry-After.
//
// A request refused by one check does not count against the later ones: a
// 403 takes no slot and no token, and a request refused for want of a slot
// takes no token. Retry-After is 1 to 5 seconds, at random, so that
// clients refused together do not come back together.

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// refusal is how admission control answers a request it turns away.
type refusal struct {
	reason string // label of sluice_connections_rejected_total
	status int
	retry  bool // send Retry-After
	msg    string
}

// Indexes of refusals.
const (
	refuseOrigin = iota
	refuseMaxConns
	refusePerIP
	refuseRate
)

var refusals = [...]refusal{
	refuseOrigin:   {"origin", http.StatusForbidden, false, "origin not allowed"},
	refuseMaxConns: {"max_connections", http.StatusServiceUnavailable, true, "sluice is at its connection limit, retry later"},
	refusePerIP:    {"max_connections_per_ip", http.StatusTooManyRequests, true, "too many connections from your address"},
	refuseRate:     {"rate_limit", http.StatusServiceUnavailable, true, "too many new connections, retry later"},
}

// admission holds the limits of one Server and what counts against them.
// Everything but the counters is immutable after newAdmission.
type admission struct {
	began    time.Time
	maxConns int64 // 0: no bound
	perIP    int   // 0: no bound
	trusted  []netip.Prefix
	origins  []originPattern // empty: any origin
	bucket   *tokenBucket    // nil: no rate limit

	// conns counts admitted connections, from the handshake to the end of
	// the session; kept only when maxConns > 0.
	conns atomic.Int64

	mu   sync.Mutex
	byIP map[netip.Addr]int // admitted connections per clientKey; guarded by mu; nil when perIP == 0

	logs [len(refusals)]rejectLog
}

func newAdmission(o *Options) (*admission, error) {
	a := &admission{
		began:    time.Now(),
		maxConns: int64(o.MaxConnections),
		perIP:    o.MaxConnectionsPerIP,
	}
	for _, s := range o.AllowedOrigins {
		p, err := parseOrigin(s, true)
		if err != nil {
			return nil, fmt.Errorf("proxy: Options.AllowedOrigins: %w", err)
		}
		a.origins = append(a.origins, p)
	}
	for _, p := range o.TrustedProxies {
		a.trusted = append(a.trusted, normalizePrefix(p))
	}
	if a.perIP > 0 {
		a.byIP = make(map[netip.Addr]int)
	}
	if o.MaxHandshakesPerSecond > 0 {
		a.bucket = newTokenBucket(o.MaxHandshakesPerSecond, o.MaxHandshakesPerSecond)
	}
	return a, nil
}

// slot is an admitted connection's place under the limits. ServeHTTP owns
// it until handOff passes it to the session, whose end frees it
// (Server.forget calls admission.leave with the same client address).
type slot struct {
	a    *admission
	key  netip.Addr
	held bool
}

// release frees the slot unless a session has taken it over.
func (t *slot) release() {
	if t.held {
		t.held = false
		t.a.free(t.key)
	}
}

// handOff gives the slot to the session about to start.
func (t *slot) handOff() { t.held = false }

// admit runs the admission checks for r from cl. When one refuses, it has
// answered the request and ok is false.
func (s *Server) admit(w http.ResponseWriter, r *http.Request, cl client) (t slot, ok bool) {
	a := s.adm
	if origins := r.Header.Values("Origin"); len(a.origins) > 0 && len(origins) > 0 {
		if len(origins) != 1 || !a.originAllowed(origins[0]) {
			s.refuse(w, r, refuseOrigin, cl)
			return slot{}, false
		}
	}
	var key netip.Addr // counted by only with a per-IP bound: no parse without
	if a.perIP > 0 {
		key = clientKey(cl.addr)
	}
	if a.maxConns > 0 && a.conns.Add(1) > a.maxConns {
		a.conns.Add(-1)
		s.refuse(w, r, refuseMaxConns, cl)
		return slot{}, false
	}
	if a.perIP > 0 && key.IsValid() {
		a.mu.Lock()
		n := a.byIP[key]
		if n < a.perIP {
			a.byIP[key] = n + 1
		}
		a.mu.Unlock()
		if n >= a.perIP {
			if a.maxConns > 0 {
				a.conns.Add(-1)
			}
			s.refuse(w, r, refusePerIP, cl)
			return slot{}, false
		}
	}
	if a.bucket != nil && !a.bucket.allow() {
		a.free(key)
		s.refuse(w, r, refuseRate, cl)
		return slot{}, false
	}
	return slot{a: a, key: key, held: true}, true
}

// free gives back what admit counted for key.
func (a *admission) free(key netip.Addr) {
	if a.maxConns > 0 {
		a.conns.Add(-1)
	}
	if a.perIP > 0 && key.IsValid() {
		a.mu.Lock()
		if n := a.byIP[key] - 1; n > 0 {
			a.byIP[key] = n
		} else {
			delete(a.byIP, key)
		}
		a.mu.Unlock()
	}
}

// leave frees the slot of a finished session whose client address is
// addr (session.clientAddr, which ServeHTTP set to client.addr).
func (a *admission) leave(addr string) {
	switch {
	case a.perIP > 0:
		a.free(clientKey(addr))
	case a.maxConns > 0:
		a.free(netip.Addr{}) // the key matters only to the per-IP count
	}
}

// refuse answers r for refusal i: counted, short text body, Retry-After
// where the client may simply try again, and a log line at most once a
// second per reason.
func (s *Server) refuse(w http.ResponseWriter, r *http.Request, i int, cl client) {
	rf := &refusals[i]
	if rf.retry {
		w.Header().Set("Retry-After", strconv.Itoa(retryAfter()))
	}
	s.reject(w, rf.status, rf.reason, rf.msg)
	n, ok := s.adm.logs[i].note(time.Since(s.adm.began))
	if !ok {
		return
	}
	ev := s.log.Warn().Str("reason", rf.reason).Str("client", cl.addr).Uint64("rejected", n)
	if i == refuseOrigin {
		o := r.Header.Get("Origin")
		if len(o) > 256 {
			o = o[:256]
		}
		ev = ev.Str("origin", o)
	}
	ev.Msg("upgrades rejected")
}

// retryAfter is a Retry-After in whole seconds, 1 to 5 at random.
func retryAfter() int { return 1 + rand.IntN(5) }

// rejectLog keeps refusals of one reason to at most one log line a
// second: a burst of thousands must not flood the log. The line carries
// the number of refusals since the previous one.
type rejectLog struct {
	next    atomic.Int64  // earliest time of the next line, as ns since admission.began
	pending atomic.Uint64 // refusals not yet reported in a line
}

// note counts one refusal at now and reports whether to log a line, and
// how many refusals it stands for.
func (l *rejectLog) note(now time.Duration) (n uint64, log bool) {
	l.pending.Add(1)
	next := l.next.Load()
	if int64(now) < next || !l.next.CompareAndSwap(next, int64(now+time.Second)) {
		return 0, false
	}
	return l.pending.Swap(0), true
}

// tokenBucket limits a rate with bursts, as the generic cell rate
// algorithm: one atomic word, the theoretical arrival time of the next
// token, stands for the bucket's level, so allow never locks.
type tokenBucket struct {
	began    time.Time
	interval int64 // ns between tokens
	slack    int64 // (burst-1)·interval: how far tat may run ahead of now
	tat      atomic.Int64
}

// newTokenBucket allows perSecond events a second on average and up to
// burst at once (both at least 1).
func newTokenBucket(perSecond, burst int) *tokenBucket {
	perSecond, burst = max(perSecond, 1), max(burst, 1)
	interval := max(int64(time.Second)/int64(perSecond), 1)
	return &tokenBucket{began: time.Now(), interval: interval, slack: int64(burst-1) * interval}
}

// allow takes a token if there is one.
func (b *tokenBucket) allow() bool {
	now := int64(time.Since(b.began))
	for {
		tat := b.tat.Load()
		t := max(tat, now)
		if t-now > b.slack {
			return false
		}
		if b.tat.CompareAndSwap(tat, t+b.interval) {
			return true
		}
	}
}

// client is who an upgrade request comes from, as admission control, the
// logs and the status page see it.
type client struct {
	// addr is the socket peer's host:port, or, when a trusted proxy
	// forwarded the request, the client IP that its headers give.
	addr string
	// xff, when not empty, is the X-Forwarded-For to send upstream in
	// place of the one forwardedHeader builds: the received list up to
	// and including the client found in it. Either way its last entry is
	// the client that sluice admitted.
	xff string
}

func (a *admission) clientOf(r *http.Request) client {
	return resolveClient(a.trusted, r.RemoteAddr, r.Header)
}

// resolveClient finds the client of a request from remoteAddr with header
// h. Only a peer within trusted is believed about who it forwards for:
// walking X-Forwarded-For from the right (or, when the request has none,
// the for= parameters of Forwarded, RFC 7239), the first address that is
// not a trusted proxy is the client. Entries left of it are the client's
// own say and are never believed. A hop that does not parse stops the
// walk: the nearest trusted hop is then the client, since nothing beyond
// it can be vouched for; the same when every hop is trusted.
func resolveClient(trusted []netip.Prefix, remoteAddr string, h http.Header) client {
	cl := client{addr: remoteAddr}
	if len(trusted) == 0 {
		return cl
	}
	peer, err := netip.ParseAddrPort(remoteAddr)
	if err != nil || !trustedAddr(trusted, peer.Addr().Unmap()) {
		return cl
	}
	if xff := h.Values("X-Forwarded-For"); len(xff) > 0 {
		hops := splitXFF(xff)
		ip, i := walkHops(trusted, hops)
		if i >= 0 {
			cl.addr = ip.String()
			cl.xff = strings.Join(append(hops[:i:i], cl.addr), ", ")
		}
		return cl
	}
	if fwd := h.Values("Forwarded"); len(fwd) > 0 {
		if ip, i := walkHops(trusted, forwardedFor(fwd)); i >= 0 {
			cl.addr = ip.String()
			cl.xff = cl.addr
		}
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
		if !trustedAddr(trusted, ip) {
			break
		}
	}
	return last, at
}

func trustedAddr(trusted []netip.Prefix, ip netip.Addr) bool {
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

// clientKey is what MaxConnectionsPerIP counts by for a client address
// (client.addr): the IPv4 address, or the /64 of an IPv6 address, since
// one IPv6 host commonly holds a whole /64. It is the zero Addr (not
// counted) when addr holds no IP, as with Unix sockets.
func clientKey(addr string) netip.Addr {
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
		return normalizePrefix(p), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("%q is not an IP address or a CIDR", s)
	}
	return normalizePrefix(netip.PrefixFrom(a, a.BitLen())), nil
}

// normalizePrefix masks p and writes IPv4-mapped prefixes as IPv4, since
// addresses are unmapped before they are looked up.
func normalizePrefix(p netip.Prefix) netip.Prefix {
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p.Masked()
}

// originPattern is an entry of Options.AllowedOrigins, or a parsed Origin
// header: scheme://host[:port] in lower case, port "" for the scheme's
// default. A wildcard pattern has host ".example.com" and matches any name
// below example.com, at any depth, but not example.com itself.
type originPattern struct {
	scheme, host, port string
	wildcard           bool
}

// CheckOriginPattern reports whether s may be an entry of
// Options.AllowedOrigins: an origin scheme://host[:port]
// (https://app.example.com, http://localhost:3000), or one whose host
// starts with "*." to allow every subdomain (https://*.example.com).
func CheckOriginPattern(s string) error {
	_, err := parseOrigin(s, true)
	return err
}

func (a *admission) originAllowed(origin string) bool {
	o, err := parseOrigin(origin, false)
	if err != nil {
		return false // "null", paths, garbage: never allowed by a list
	}
	for _, p := range a.origins {
		if p.scheme == o.scheme && p.port == o.port &&
			(o.host == p.host || p.wildcard && len(o.host) > len(p.host) && strings.HasSuffix(o.host, p.host)) {
			return true
		}
	}
	return false
}

var errOriginForm = errors.New("an origin is scheme://host[:port], such as https://app.example.com or https://*.example.com")

// parseOrigin reads an origin; pattern allows a leading "*." label.
func parseOrigin(s string, pattern bool) (originPattern, error) {
	bad := func(why string) (originPattern, error) {
		return originPattern{}, fmt.Errorf("%q %s; %w", s, why, errOriginForm)
	}
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok || !validScheme(scheme) {
		return bad("has no scheme://")
	}
	if strings.ContainsAny(rest, "/?#@\\ \t") {
		return bad("has more than a host and port")
	}
	o := originPattern{scheme: strings.ToLower(scheme)}
	host, port := rest, ""
	if strings.HasPrefix(rest, "[") {
		end := strings.IndexByte(rest, ']')
		if end < 0 {
			return bad("has an unterminated IPv6 literal")
		}
		ip, err := netip.ParseAddr(rest[1:end])
		if err != nil || !ip.Is6() || ip.Zone() != "" {
			return bad("has an invalid IPv6 literal")
		}
		host, port = "["+ip.String()+"]", rest[end+1:]
		if port != "" && port[0] != ':' {
			return bad("has an invalid port")
		}
		port = strings.TrimPrefix(port, ":")
		if port == "" && strings.HasSuffix(rest, ":") {
			return bad("has an empty port")
		}
	} else {
		var hasPort bool
		host, port, hasPort = strings.Cut(rest, ":")
		if hasPort && port == "" {
			return bad("has an empty port")
		}
		if pattern && strings.HasPrefix(host, "*.") {
			o.wildcard = true
			host = host[1:] // keep the dot: ".example.com"
		}
		host = strings.ToLower(host)
		if !validHostname(strings.TrimPrefix(host, ".")) || (!o.wildcard && strings.HasPrefix(host, ".")) {
			if strings.Contains(host, "*") {
				return bad("has a * that is not a leading *. label")
			}
			return bad("has an invalid host")
		}
	}
	if port != "" {
		n, err := strconv.ParseUint(port, 10, 16)
		if err != nil || n == 0 {
			return bad("has an invalid port")
		}
		port = strconv.FormatUint(n, 10)
		if port == defaultPort(o.scheme) {
			port = ""
		}
	}
	o.host, o.port = host, port
	return o, nil
}

func validScheme(s string) bool {
	if s == "" || !('a' <= s[0]|0x20 && s[0]|0x20 <= 'z') {
		return false
	}
	for i := range len(s) {
		c := s[i] | 0x20
		if !('a' <= c && c <= 'z') && !('0' <= s[i] && s[i] <= '9') && s[i] != '+' && s[i] != '-' && s[i] != '.' {
			return false
		}
	}
	return true
}

// validHostname accepts dot-separated labels of letters, digits, '-' and
// '_' (IDNs are written in punycode, as browsers send them).
func validHostname(h string) bool {
	if h == "" || len(h) > 253 {
		return false
	}
	for label := range strings.SplitSeq(h, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for i := range len(label) {
			c := label[i]
			if !('a' <= c && c <= 'z') && !('0' <= c && c <= '9') && c != '-' && c != '_' {
				return false
			}
		}
	}
	return true
}

func defaultPort(scheme string) string {
	switch scheme {
	case "http", "ws":
		return "80"
	case "https", "wss":
		return "443"
	}
	return ""
}

// frameWatch enforces Options.FrameReadTimeout on a session's client leg.
// Between frames a client may idle (keepalive deals with idle clients);
// once a frame has started arriving, its header and payload must arrive
// within the timeout. The client's reader marks frames with frameStart and
// frameEnd: an atomic store or two and, at most once per frame, a clock
// read; the timer is re-armed only when it fires, not per frame.
type frameWatch struct {
	// started is when the current frame began, as ns since the session
	// began, plus one; 0 between frames. Written by the client's reader,
	// and moved forward by the timer while the upstream holds sluice back.
	started   atomic.Int64
	streaming atomic.Bool // the frame's payload is spliced by the upstream writer
	armed     atomic.Bool // the timer is set
	timer     atomic.Pointer[time.Timer]
}

// frameTimeout is the leg's frame read timeout; 0 when there is none
// (always for the upstream, which is trusted).
func (l *leg) frameTimeout() time.Duration {
	if l.upstream {
		return 0
	}
	return l.s.srv.opts.FrameReadTimeout
}

// frameStart: the reader has read header h; from here the frame must
// arrive whole within the timeout. Only the leg's reader calls it.
func (l *leg) frameStart(h ws.Header) {
	d := l.frameTimeout()
	if d <= 0 {
		return
	}
	w := &l.s.frames
	w.streaming.Store(!h.OpCode.IsControl() && h.Length > inlineMax)
	if w.started.Load() == 0 { // else it started in frameEnd, already buffered
		l.watchFrom(d)
	}
}

// frameEnd: the reader is done with a frame and about to read the next
// header. Bytes of it already buffered mean the next frame has started;
// otherwise the client may now idle. Only the leg's reader calls it.
func (l *leg) frameEnd() {
	d := l.frameTimeout()
	if d <= 0 {
		return
	}
	w := &l.s.frames
	w.streaming.Store(false)
	if l.rd.Buffered() > 0 {
		l.watchFrom(d)
	} else {
		w.end()
	}
}

// watchFrom starts the clock for a frame now and sets the timer if it is
// not set already.
func (l *leg) watchFrom(d time.Duration) {
	w := &l.s.frames
	if !w.begin(time.Since(l.s.began)) {
		return
	}
	if t := w.timer.Load(); t != nil {
		t.Reset(d)
		return
	}
	// Made stopped, stored, then set: the callback always finds it.
	t := time.AfterFunc(math.MaxInt64, l.s.frameTimerFired)
	w.timer.Store(t)
	t.Reset(d)
}

// begin starts the clock of a frame at now (since the session began) and
// reports whether the caller must set the timer.
func (w *frameWatch) begin(now time.Duration) (arm bool) {
	w.started.Store(int64(now) + 1)
	return !w.armed.Load() && w.armed.CompareAndSwap(false, true)
}

// end: no frame is arriving; the client may idle.
func (w *frameWatch) end() { w.started.Store(0) }

// check runs when the timer fires, at now (since the session began), and
// reports whether the current frame is overdue; if a frame is arriving
// but not overdue, it re-arms the timer for its deadline. held says that
// sluice itself is holding the client back (its frames toward the
// upstream are queued): the time does not count then, and the frame's
// clock restarts.
func (w *frameWatch) check(now, timeout time.Duration, held bool) (overdue bool) {
	w.armed.Store(false)
	st := w.started.Load()
	if st == 0 {
		return false // idle: the next frame re-arms
	}
	if held {
		w.started.CompareAndSwap(st, int64(now)+1)
		w.rearm(timeout)
		return false
	}
	if left := time.Duration(st-1) + timeout - now; left > 0 {
		w.rearm(left)
		return false
	}
	return true
}

func (w *frameWatch) rearm(d time.Duration) {
	if w.armed.CompareAndSwap(false, true) {
		w.timer.Load().Reset(d)
	}
}

// stop ends the watch for good; Server.forget calls it.
func (w *frameWatch) stop() {
	if t := w.timer.Load(); t != nil {
		t.Stop()
	}
}

// frameTimerFired is the frame watch's timer callback.
func (s *session) frameTimerFired() {
	held := s.upstream.out.Bytes() > 0
	if !s.frames.check(time.Since(s.began), s.srv.opts.FrameReadTimeout, held) {
		return
	}
	s.mu.Lock()
	ending := s.endReason != "" || s.aborted
	s.mu.Unlock()
	if ending {
		return // closing for another reason already (client gone mid-frame, ...)
	}
	// Evicted: 1001 to the upstream, 1013 to the client after what the
	// upstream sends until it answers (close.go). A frame being spliced to
	// the upstream is torn and no close frame can follow it there: failing
	// the client's socket for reads ends the splice, and the upstream
	// connection is cut.
	s.end(causeReadTimeout, nil)
	if s.frames.streaming.Load() {
		s.client.conn.SetReadDeadline(time.Now())
	}
}
