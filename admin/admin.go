// Package admin is sluice's admin listener: the process-wide metrics that
// are not a session's (queue budget gauges, queue depths), health
// and readiness for the orchestrator, the live status page and its JSON,
// and Go's profiles when asked for. It reads the proxy; it never changes
// it.
package admin

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sluice-proxy/sluice/proxy"
)

// readyWindow is how recent a successful upstream connect must be for
// /readyz to answer without probing the upstream itself.
const readyWindow = 10 * time.Second

// Handler serves the operator's endpoints: /metrics from reg, /healthz,
// /readyz (not draining, and the upstream accepted a TCP connection
// recently); status, if not nil, adds the live status page, and withPprof
// Go's profiles (SLUICE_PPROF). The status page lists every client's
// address and the profiles expose internals: both answer loopback peers
// only (kubectl port-forward, a shell in the pod), and others that send
// token, when not empty, as a bearer token (SLUICE_ADMIN_TOKEN). Health
// and metrics stay open: kubelet probes and Prometheus come from other
// addresses.
func Handler(srv *proxy.Server, reg *prometheus.Registry, upstream *url.URL, status *StatusPage, withPprof bool, token string) http.Handler {
	mux := http.NewServeMux()
	gate := privateGate{token: token}
	if token != "" {
		gate.sum = sha256.Sum256([]byte(token))
	}
	if status != nil {
		mux.Handle("GET /status", gate.wrap(http.HandlerFunc(status.servePage)))
		mux.Handle("GET /status.json", gate.wrap(http.HandlerFunc(status.serveJSON)))
	}
	if withPprof {
		pm := http.NewServeMux()
		registerPprof(pm)
		mux.Handle("/debug/pprof/", gate.wrap(pm))
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

// privateGate lets through loopback peers, and others with the admin
// token as a bearer token.
type privateGate struct {
	token string
	sum   [sha256.Size]byte // of token: compared in constant time, whatever the length sent
}

func (g privateGate) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if g.allows(r) {
			h.ServeHTTP(w, r)
			return
		}
		if g.token == "" {
			http.Error(w, "this page answers loopback peers only (kubectl port-forward), unless SLUICE_ADMIN_TOKEN is set", http.StatusForbidden)
			return
		}
		w.Header().Set("WWW-Authenticate", `Bearer realm="sluice admin"`)
		http.Error(w, "send SLUICE_ADMIN_TOKEN as Authorization: Bearer <token>", http.StatusUnauthorized)
	})
}

func (g privateGate) allows(r *http.Request) bool {
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil && ap.Addr().Unmap().IsLoopback() {
		return true
	}
	if g.token == "" {
		return false
	}
	scheme, sent, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return false
	}
	sum := sha256.Sum256([]byte(strings.TrimSpace(sent)))
	return subtle.ConstantTimeCompare(sum[:], g.sum[:]) == 1
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
