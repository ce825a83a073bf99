package proxy

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"

	"github.com/rs/zerolog"
)

// TestServeHTTPPassThrough: embedded in an http.Server (ServeHTTP), a
// Server with HTTPPassThrough sends plain requests to the upstream's
// origin through the ResponseWriter it is given; without it, 426.
func TestServeHTTPPassThrough(t *testing.T) {
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "app saw "+r.URL.RequestURI())
	}))
	defer app.Close()
	for _, on := range []bool{true, false} {
		u, _ := url.Parse("ws://" + app.Listener.Addr().String() + "/base")
		srv, err := New(Options{Upstream: u, Logger: zerolog.Nop(), HTTPPassThrough: on})
		if err != nil {
			t.Fatal(err)
		}
		front := httptest.NewServer(srv)
		resp, err := front.Client().Get(front.URL + "/page?x=1")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		front.Close()
		srv.Shutdown(context.Background())
		switch {
		case on && (resp.StatusCode != 200 || string(b) != "app saw /base/page?x=1"):
			t.Errorf("pass-through on: %d %q, want 200 \"app saw /base/page?x=1\"", resp.StatusCode, b)
		case !on && resp.StatusCode != http.StatusUpgradeRequired:
			t.Errorf("pass-through off: %d %q, want 426", resp.StatusCode, b)
		}
	}
}
