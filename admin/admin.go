// Package admin is sluice's admin listener: the process-wide metrics that
// are not a session's (queue budget gauges, queue depths), health
// and readiness for the orchestrator, the live status page and its JSON,
// and Go's profiles when asked for. It reads the proxy; it never changes
// it.
package admin

import (
	"context"
	"net"
	"net/http"
	"net/http/pprof"
	"net/url"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"sluice/proxy"
)

// readyWindow is how recent a successful upstream connect must be for
// /readyz to answer without probing the upstream itself.
const readyWindow = 10 * time.Second

// Handler serves the operator's endpoints: /metrics from reg, /healthz,
// /readyz (not draining, and the upstream accepted a TCP connection
// recently); status, if not nil, adds the live status page, and withPprof
// Go's profiles (SLUICE_PPROF).
func Handler(srv *proxy.Server, reg *prometheus.Registry, upstream *url.URL, status *StatusPage, withPprof bool) http.Handler {
	mux := http.NewServeMux()
	if status != nil {
		mux.HandleFunc("GET /status", status.servePage)
		mux.HandleFunc("GET /status.json", status.serveJSON)
	}
	if withPprof {
		registerPprof(mux)
	}
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok\n"))
	})
	probe := &upstreamProbe{addr: upstreamHostPort(upstream), srv: srv}
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if srv.Draining() {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		if err := probe.check(r.Context()); err != nil {
			http.Error(w, "upstream unreachable: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	return mux
}

// registerPprof serves net/http/pprof's handlers under /debug/pprof/ on
// mux. They are named here rather than left to the package's init, which
// puts them on http.DefaultServeMux: nothing in sluice serves that mux, so
// the profiles are only ever on the admin listener, and only when asked
// for. Index serves every named profile (heap, goroutine, allocs, …) under
// /debug/pprof/NAME.
func registerPprof(mux *http.ServeMux) {
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
}

// upstreamProbe answers "did the upstream accept a TCP connection
// recently?", dialling it itself at most once per readyWindow when no
// session did.
type upstreamProbe struct {
	addr string
	srv  *proxy.Server

	mu       sync.Mutex
	lastOK   time.Time // guarded by mu
	lastFail error     // guarded by mu
	lastTry  time.Time // guarded by mu
}

func (p *upstreamProbe) check(ctx context.Context) error {
	if time.Since(p.srv.LastUpstreamConnect()) < readyWindow {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if time.Since(p.lastOK) < readyWindow {
		return nil
	}
	if time.Since(p.lastTry) < time.Second && p.lastFail != nil {
		return p.lastFail
	}
	p.lastTry = time.Now()
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", p.addr)
	if err != nil {
		p.lastFail = err
		return err
	}
	c.Close()
	p.lastOK, p.lastFail = time.Now(), nil
	return nil
}

// upstreamHostPort is the TCP address of the upstream URL.
func upstreamHostPort(u *url.URL) string {
	if u.Port() != "" {
		return u.Host
	}
	if u.Scheme == "wss" {
		return net.JoinHostPort(u.Hostname(), "443")
	}
	return net.JoinHostPort(u.Hostname(), "80")
}
