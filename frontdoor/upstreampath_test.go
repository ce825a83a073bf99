package frontdoor

import (
	"net/url"
	"testing"
)

// upstreamPathCases are the README's examples of SLUICE_UPSTREAM_URL's
// path: a prefix joined to the client's path with one slash between, the
// queries both kept (the upstream's first), as net/http/httputil's
// NewSingleHostReverseProxy and nginx's proxy_pass with a URI under
// location / do. Upgrades and pass-through requests use the same rule.
var upstreamPathCases = []struct{ upstream, request, want string }{
	{"ws://backend:8080", "/chat?room=1", "ws://backend:8080/chat?room=1"},
	{"ws://backend:8080/", "/chat", "ws://backend:8080/chat"},
	{"ws://backend:8080/app", "/chat", "ws://backend:8080/app/chat"},
	{"ws://backend:8080/app/", "/chat", "ws://backend:8080/app/chat"},
	{"ws://backend:8080/app", "/", "ws://backend:8080/app/"},
	// The trap the README warned of: the prefix is not matched against
	// the client's path, it is added to it.
	{"ws://backend:8080/socket", "/socket", "ws://backend:8080/socket/socket"},
	{"ws://backend:8080/app?v=2", "/chat?room=1", "ws://backend:8080/app/chat?v=2&room=1"},
	{"ws://backend:8080/app?v=2", "/chat", "ws://backend:8080/app/chat?v=2"},
	{"ws://backend/a%2Fb", "/c%2Fd?x=%20", "ws://backend/a%2Fb/c%2Fd?x=%20"},
	{"wss://backend:8443/app", "/chat", "wss://backend:8443/app/chat"},
	// Pass-through requests join the same way to the origin (http for ws).
	{"http://backend:8080/app", "/static/app.js", "http://backend:8080/app/static/app.js"},
}

func TestUpstreamURLPaths(t *testing.T) {
	for _, tc := range upstreamPathCases {
		base, err := url.Parse(tc.upstream)
		if err != nil {
			t.Fatal(err)
		}
		req, err := url.ParseRequestURI(tc.request)
		if err != nil {
			t.Fatal(err)
		}
		if got := UpstreamURL(base, req); got != tc.want {
			t.Errorf("upstream %s, request %s: got %s, want %s", tc.upstream, tc.request, got, tc.want)
		}
	}
}
