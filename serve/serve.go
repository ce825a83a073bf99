// Package serve runs sluice as a process does: the proxy on its listener
// (wss:// with a reloadable certificate when configured), the admin
// listener beside it, and the drain when the context ends. The binary, the
// demo and the end-to-end tests of the admin listener all start sluice
// through Run.
package serve

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/admin"
	"github.com/sluice-proxy/sluice/certs"
	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/frontdoor"
	"github.com/sluice-proxy/sluice/proxy"
	"github.com/sluice-proxy/sluice/version"
)

// Listening is what Run reports once both listeners listen.
type Listening struct {
	Addr      string // the WebSocket listener's host:port
	AdminAddr string // the admin listener's host:port; empty when it is off
	Server    *proxy.Server
}

// Run runs the proxy and its admin listener until ctx ends, then drains:
// readiness fails first, new clients are still served for
// SLUICE_DRAIN_DELAY, then every session is closed within
// SLUICE_SHUTDOWN_TIMEOUT. ready, if not nil, is called once both
// listeners listen. Run returns only after every goroutine it started has
// ended; its error is a start-up failure or the listener's.
func Run(ctx context.Context, cfg config.Config, log zerolog.Logger, ready func(Listening)) error {
	checkHostLimits(log, cfg.MaxConnections)
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	opts, err := cfg.ProxyOptions(log, reg)
	if err != nil {
		return err
	}
	srv, err := proxy.New(opts)
	if err != nil {
		return err
	}
	serving := false
	defer func() {
		if !serving {
			// Start-up failed after New: end its guard goroutine too.
			srv.Shutdown(context.Background())
		}
	}()
	admin.RegisterBudgetMetrics(reg, srv.Budget())
	build := version.Get()
	admin.RegisterBuildInfo(reg, build)
	ln, stopTLS, err := listen(ctx, cfg, log, srv)
	if err != nil {
		return err
	}
	defer stopTLS()
	var adminSrv *http.Server
	adminAddr := ""
	if cfg.AdminAddr != "" {
		aln, err := net.Listen("tcp", cfg.AdminAddr)
		if err != nil {
			ln.Close()
			return fmt.Errorf("%sADMIN_ADDR=%q: %w", config.Prefix, cfg.AdminAddr, err)
		}
		adminAddr = aln.Addr().String()
		// The status page samples its history until Run returns, so
		// the drain is on its chart too.
		statusCtx, stopStatus := context.WithCancel(context.WithoutCancel(ctx))
		status := admin.NewStatusPage(statusCtx, srv, reg, opts.Queue.Policy.String())
		defer status.Wait()
		defer stopStatus()
		adminSrv = &http.Server{Handler: admin.Handler(srv, reg, opts.Upstream, status, cfg.Pprof, cfg.AdminToken), ReadHeaderTimeout: 5 * time.Second}
		go adminSrv.Serve(aln)
	}
	serving = true
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	log.Info().Str("version", build.Version).Str("commit", build.Commit).
		Str("addr", ln.Addr().String()).Str("admin_addr", adminAddr).
		Str("upstream", frontdoor.LogURL(opts.Upstream.String(), opts.LogQuery)).Str("policy", opts.Queue.Policy.String()).
		Int64("global_queue_max_bytes", opts.Budget.Ceiling).Msg("listening")
	if ready != nil {
		ready(Listening{Addr: ln.Addr().String(), AdminAddr: adminAddr, Server: srv})
	}

	var serveFailed error
	select {
	case <-ctx.Done():
	case err := <-serveErr:
		// The listener failed: nobody new can connect, but the sessions
		// and the admin server still need closing before Run returns.
		if !errors.Is(err, http.ErrServerClosed) {
			serveFailed = err
		}
	}
	drain(srv, adminSrv, cfg, log, serveFailed == nil)
	return serveFailed
}

// listen opens the WebSocket listener; with SLUICE_PROXY_PROTOCOL it
// reads a PROXY header first; with a certificate pair it serves TLS and
// stop ends the certificate watcher (the admin listener stays plain HTTP). stop is never nil when err is nil.
func listen(ctx context.Context, cfg config.Config, log zerolog.Logger, srv *proxy.Server) (_ net.Listener, stop func(), _ error) {
	// TCP keepalive off on accepted connections, as on upstream ones:
	// keepalive is sluice's pings, and the probes' setup costs syscalls.
	lc := net.ListenConfig{KeepAlive: -1}
	ln, err := lc.Listen(ctx, "tcp", cfg.ListenAddr)
	if err != nil {
		return nil, nil, fmt.Errorf("%sLISTEN_ADDR=%q: %w", config.Prefix, cfg.ListenAddr, err)
	}
	if cfg.ProxyProtocol {
		// The PROXY header comes first, before TLS.
		ln = srv.ProxyProtocolListener(ln)
	}
	if cfg.TLSCertFile == "" {
		return ln, func() {}, nil
	}
	tln, stop, err := certs.Listen(ctx, ln, cfg.TLSCertFile, cfg.TLSKeyFile, log)
	if err != nil {
		// Load checked the files; they changed since.
		return nil, nil, fmt.Errorf("%sTLS_CERT_FILE=%q, %sTLS_KEY_FILE=%q: %w",
			config.Prefix, cfg.TLSCertFile, config.Prefix, cfg.TLSKeyFile, err)
	}
	return tln, stop, nil
}

// drain closes the sessions and the admin server within
// SLUICE_SHUTDOWN_TIMEOUT. With delay, new clients are still served for
// SLUICE_DRAIN_DELAY first, while readiness fails, so the load balancer
// can notice.
func drain(srv *proxy.Server, adminSrv *http.Server, cfg config.Config, log zerolog.Logger, delay bool) {
	srv.BeginDrain()
	log.Info().Int("sessions", srv.Sessions()).Float64("delay_seconds", cfg.DrainDelay.Seconds()).
		Float64("spread_seconds", cfg.DrainSpread.Seconds()).Float64("timeout_seconds", cfg.ShutdownTimeout.Seconds()).Msg("draining")
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	if cfg.DrainDelay > 0 && delay {
		t := time.NewTimer(cfg.DrainDelay)
		select {
		case <-t.C:
		case <-sctx.Done():
		}
		t.Stop()
	}
	err := srv.Shutdown(sctx)
	if adminSrv != nil {
		adminSrv.Shutdown(sctx)
	}
	if err != nil {
		log.Warn().Err(err).Msg("drain cut short")
	}
	log.Info().Msg("stopped")
}
