package frontdoor

import "strings"

// queryRedacted stands for a query value in the logs.
const queryRedacted = "REDACTED"

// LogURL is the URL u as log lines carry it: with its path and the keys
// of its query, but neither the query's values nor a password, unless
// withQuery. Browsers cannot set headers on a WebSocket, so apps put
// tokens in the query string, and log pipelines are read by more people
// than the backend's secrets should be. An item without '=' may be a
// bare token: it is redacted whole. A URL with no query and no userinfo
// is returned as it is, without allocating.
func LogURL(u string, withQuery bool) string {
	authority := 0
	if i := strings.Index(u, "://"); i >= 0 && !strings.ContainsAny(u[:i], "/?#") {
		authority = i + 3
	}
	hostEnd := len(u)
	if i := strings.IndexAny(u[authority:], "/?#"); i >= 0 {
		hostEnd = authority + i
	}
	at := strings.LastIndexByte(u[authority:hostEnd], '@')
	q := strings.IndexByte(u[hostEnd:], '?')
	if q >= 0 {
		q += hostEnd
	}
	if f := strings.IndexByte(u[hostEnd:], '#'); f >= 0 && q > hostEnd+f {
		q = -1 // in the fragment
	}
	if at < 0 && (q < 0 || withQuery) {
		return u
	}
	var b strings.Builder
	b.Grow(len(u) + 16)
	if at >= 0 {
		userinfo := u[authority : authority+at]
		b.WriteString(u[:authority])
		if user, _, hasPassword := strings.Cut(userinfo, ":"); hasPassword {
			b.WriteString(user)
			b.WriteString(":xxxxx")
		} else {
			b.WriteString(userinfo)
		}
		b.WriteString(u[authority+at : hostEnd])
	} else {
		b.WriteString(u[:hostEnd])
	}
	if q < 0 || withQuery {
		b.WriteString(u[hostEnd:])
		return b.String()
	}
	b.WriteString(u[hostEnd : q+1])
	query, fragment, hasFragment := strings.Cut(u[q+1:], "#")
	for i, item := range strings.Split(query, "&") {
		if i > 0 {
			b.WriteByte('&')
		}
		key, _, hasValue := strings.Cut(item, "=")
		switch {
		case hasValue:
			b.WriteString(key)
			b.WriteString("=" + queryRedacted)
		case item != "":
			b.WriteString(queryRedacted)
		}
	}
	if hasFragment {
		b.WriteString("#" + fragment)
	}
	return b.String()
}
