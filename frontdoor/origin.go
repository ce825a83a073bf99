package frontdoor

// Origin patterns: which web origins may open WebSockets through sluice
// (Options.AllowedOrigins), checked by admission control.

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

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

// Origins are the parsed entries of Options.AllowedOrigins.
type Origins []originPattern

// ParseOrigins parses list, each entry as CheckOriginPattern wants it.
func ParseOrigins(list []string) (Origins, error) {
	var out Origins
	for _, s := range list {
		p, err := parseOrigin(s, true)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

// Allowed reports whether the Origin header value origin matches one of
// the patterns.
func (list Origins) Allowed(origin string) bool {
	o, err := parseOrigin(origin, false)
	if err != nil {
		return false // "null", paths, garbage: never allowed by a list
	}
	for _, p := range list {
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
