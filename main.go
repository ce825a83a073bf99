// Command sluice is a WebSocket reverse proxy that keeps slow clients from
// taking a backend down: frame-aware splicing, bounded per-client queues
// with evict, drop and pause policies, global memory guards and keepalive.
//
// It is configured only through SLUICE_* environment variables; see
// config.example.env. `sluice demo` runs a self-contained demonstration.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/KimMachineGun/automemlimit/memlimit"
	"github.com/caarlos0/env/v11"
	"github.com/gobwas/ws"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/rs/zerolog"

	"sluice/keepalive"
	"sluice/limiter"
	"sluice/proxy"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], env.ToMap(os.Environ()), os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "sluice:", err)
		os.Exit(1)
	}
}

// run is sluice's whole life, from configuration to drained shutdown. ctx
// ending (SIGTERM, SIGINT) starts the drain.
func run(ctx context.Context, args []string, environ map[string]string, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		switch args[0] {
		case "demo":
			return runDemo(ctx, args[1:], environ, stdout, stderr)
		case "-h", "-help", "--help", "help":
			fmt.Fprintln(stdout, usage)
			return nil
		default:
			return fmt.Errorf("unknown command %q\n%s", args[0], usage)
		}
	}
	cfg, err := LoadConfig(environ)
	if err != nil {
		return err
	}
	log := newLogger(cfg, stderr)
	for _, w := range cfg.Warnings() {
		log.Warn().Msg(w)
	}
	// GOMEMLIMIT from the cgroup (90% of it), unless set explicitly: the
	// global queue ceiling is a share of it.
	if _, err := memlimit.Set(); err != nil {
		log.Debug().Err(err).Msg("no cgroup memory limit found")
	}
	return serve(ctx, cfg, log, nil)
}

const usage = `usage: sluice          run the proxy (configured by SLUICE_* variables, see config.example.env)
       sluice demo     run a built-in backend, sluice and a fleet of fast and slow clients`

func newLogger(cfg Config, w io.Writer) zerolog.Logger {
	if cfg.LogFormat == LogFormatConsole {
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: time.TimeOnly}
	}
	return zerolog.New(w).Level(cfg.LogLevel).With().Timestamp().Logger()
}

// serve runs the proxy and its admin listener until ctx ends, then drains.
// ready, if not nil, receives the two listen addresses once both listen.
func serve(ctx context.Context, cfg Config, log zerolog.Logger, ready func(wsAddr, adminAddr string, srv *proxy.Server)) error {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	opts := proxyOptions(cfg, log, reg)
	upTLS, err := upstreamTLSConfig(cfg)
	if err != nil {
		return err
	}
	opts.UpstreamTLS = upTLS
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
	registerBudgetMetrics(reg, srv)
	// TCP keepalive off on accepted connections, as on upstream ones:
	// keepalive is sluice's pings, and the probes' setup costs syscalls.
	lc := net.ListenConfig{KeepAlive: -1}
	ln, err := lc.Listen(ctx, "tcp", cfg.ListenAddr)
	if err != nil {
		return fmt.Errorf("SLUICE_LISTEN_ADDR=%q: %w", cfg.ListenAddr, err)
	}
	if cfg.TLSCertFile != "" {
		// wss:// with a reloadable certificate (tls.go); the admin
		// listener below stays plain HTTP.
		var stopTLS func()
		if ln, stopTLS, err = listenTLS(ctx, ln, cfg, log); err != nil {
			return err
		}
		defer stopTLS()
	}
	var admin *http.Server
	adminAddr := ""
	if cfg.AdminAddr != "" {
		aln, err := net.Listen("tcp", cfg.AdminAddr)
		if err != nil {
			ln.Close()
			return fmt.Errorf("SLUICE_ADMIN_ADDR=%q: %w", cfg.AdminAddr, err)
		}
		adminAddr = aln.Addr().String()
		// The status page samples its history until serve returns, so
		// the drain is on its chart too.
		statusCtx, stopStatus := context.WithCancel(context.WithoutCancel(ctx))
		status := newStatusPage(statusCtx, srv, reg, opts.Queue.Policy.String())
		defer status.Wait()
		defer stopStatus()
		admin = &http.Server{Handler: adminHandler(srv, reg, upstreamHostPort(opts.Upstream), status, cfg.Pprof), ReadHeaderTimeout: 5 * time.Second}
		go admin.Serve(aln)
	}
	serving = true
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	log.Info().Str("addr", ln.Addr().String()).Str("admin_addr", adminAddr).
		Str("upstream", opts.Upstream.String()).Str("policy", opts.Queue.Policy.String()).
		Int64("global_queue_max_bytes", opts.Budget.Ceiling).Msg("listening")
	if ready != nil {
		ready(ln.Addr().String(), adminAddr, srv)
	}

	var serveFailed error
	select {
	case <-ctx.Done():
	case err := <-serveErr:
		// The listener failed: nobody new can connect, but the sessions
		// and the admin server still need closing before serve returns.
		if !errors.Is(err, http.ErrServerClosed) {
			serveFailed = err
		}
	}
	// Readiness fails first; new clients are still served for DrainDelay
	// so the load balancer can notice, then the sessions are closed.
	srv.BeginDrain()
	log.Info().Int("sessions", srv.Sessions()).Dur("delay", cfg.DrainDelay).
		Dur("spread", cfg.DrainSpread).Dur("timeout", cfg.ShutdownTimeout).Msg("draining")
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	if cfg.DrainDelay > 0 && serveFailed == nil {
		t := time.NewTimer(cfg.DrainDelay)
		select {
		case <-t.C:
		case <-sctx.Done():
		}
		t.Stop()
	}
	err = srv.Shutdown(sctx)
	if admin != nil {
		admin.Shutdown(sctx)
	}
	if err != nil {
		log.Warn().Err(err).Msg("drain cut short")
	}
	log.Info().Msg("stopped")
	return serveFailed
}

// proxyOptions translates the configuration for the proxy package.
func proxyOptions(cfg Config, log zerolog.Logger, reg prometheus.Registerer) proxy.Options {
	policy, _ := limiter.ParsePolicy(string(cfg.Policy))
	return proxy.Options{
		Upstream:            cfg.UpstreamURL,
		Logger:              log,
		Registerer:          reg,
		DialTimeout:         cfg.UpstreamDialTimeout,
		HandshakeTimeout:    cfg.HandshakeTimeout,
		WriteTimeout:        cfg.WriteTimeout,
		CloseTimeout:        cfg.CloseTimeout,
		DrainSpread:         cfg.DrainSpread,
		MaxHeaderBytes:      int(cfg.MaxHeaderBytes),
		MaxFrameBytes:       int64(cfg.MaxFrameBytes),
		MaxMessageBytes:     int64(cfg.MaxMessageBytes),
		UpstreamFailureCode: ws.StatusCode(cfg.UpstreamCloseCode),
		UpstreamReadBuffer:  int(cfg.UpstreamReadBuffer),
		ClientWriteBuffer:   int(cfg.ClientWriteBuffer),
		NoIdlePoll:          !cfg.IdlePoll,

		// Client limits; LoadConfig has checked every entry.
		FrameReadTimeout:       cfg.FrameReadTimeout,
		MaxConnections:         cfg.MaxConnections,
		MaxConnectionsPerIP:    cfg.MaxConnectionsPerIP,
		TrustedProxies:         trustedProxies(cfg.TrustedProxies),
		AllowedOrigins:         listEntries(cfg.AllowedOrigins),
		MaxHandshakesPerSecond: cfg.MaxHandshakesPerSecond,

		Queue: limiter.Config{
			Policy:      policy,
			MaxMessages: cfg.QueueMaxMessages,
			MaxBytes:    int64(cfg.QueueMaxBytes),
			LowWater:    cfg.QueueLowWater,
			KeepNewest:  cfg.DropKeepNewest,
			PauseMax:    cfg.PauseMax,
			SlowDepth:   cfg.SlowClientDepth,
		},
		Budget: limiter.BudgetConfig{
			Ceiling:   cfg.GlobalQueueMaxBytes.Resolve(memoryLimit()),
			SlowRatio: cfg.SlowClientMaxRatio,
		},
		Keepalive:         keepalive.Config{Interval: cfg.PingInterval, Timeout: cfg.PongTimeout},
		UpstreamKeepalive: keepalive.Config{Interval: cfg.UpstreamPingInterval, Timeout: cfg.PongTimeout},
	}
}

// trustedProxies parses SLUICE_TRUSTED_PROXIES, which LoadConfig has
// checked.
func trustedProxies(entries []string) []netip.Prefix {
	var out []netip.Prefix
	for _, e := range listEntries(entries) {
		if p, err := proxy.ParseTrustedProxy(e); err == nil {
			out = append(out, p)
		}
	}
	return out
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
