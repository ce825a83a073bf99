package admin

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/proxy"
)

// adminHandler is Handler over a proxy that serves nobody, with the
// status page and the profiles.
func adminHandler(t *testing.T, token string) http.Handler {
	t.Helper()
	reg := prometheus.NewRegistry()
	up := &url.URL{Scheme: "ws", Host: "127.0.0.1:1"}
	srv, err := proxy.New(proxy.Options{Upstream: up, Logger: zerolog.Nop(), Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	status := NewStatusPage(ctx, srv, reg, "evict")
	t.Cleanup(func() {
		cancel()
		status.Wait()
		srv.Shutdown(context.Background())
	})
	return Handler(srv, reg, up, status, true, token)
}

// TestStatusIsPrivate: the status page, its JSON and the profiles answer
// loopback peers, and others only with the admin token as a bearer
// token; health and metrics answer everyone.
func TestStatusIsPrivate(t *testing.T) {
	const token = "0123456789abcdef-secret"
	private := []string{"/status", "/status.json", "/debug/pprof/"}
	open := []string{"/metrics", "/healthz"}
	for _, c := range []struct {
		name, token, peer, auth string
		want                    int // for private paths
	}{
		{"loopback, no token set", "", "127.0.0.1:40000", "", 200},
		{"IPv6 loopback", "", "[::1]:40000", "", 200},
		{"pod network, no token set", "", "10.1.2.3:40000", "", 403},
		{"pod network, token set, none sent", token, "10.1.2.3:40000", "", 401},
		{"pod network, wrong token", token, "10.1.2.3:40000", "Bearer 0123456789abcdef-secreT", 401},
		{"pod network, token as Basic", token, "10.1.2.3:40000", "Basic " + token, 401},
		{"pod network, right token", token, "10.1.2.3:40000", "Bearer " + token, 200},
		{"pod network, lower-case scheme", token, "10.1.2.3:40000", "bearer " + token, 200},
		{"loopback, token set, none sent", token, "127.0.0.1:40000", "", 200},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := adminHandler(t, c.token)
			get := func(path string) int {
				r := httptest.NewRequest(http.MethodGet, path, nil)
				r.RemoteAddr = c.peer
				if c.auth != "" {
					r.Header.Set("Authorization", c.auth)
				}
				w := httptest.NewRecorder()
				h.ServeHTTP(w, r)
				return w.Code
			}
			for _, path := range private {
				if got := get(path); got != c.want {
					t.Errorf("GET %s: %d, want %d", path, got, c.want)
				}
			}
			for _, path := range open {
				if got := get(path); got != http.StatusOK {
					t.Errorf("GET %s: %d, want 200", path, got)
				}
			}
		})
	}
}
