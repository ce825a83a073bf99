// Command sluice is a WebSocket reverse proxy that keeps slow clients from
// taking a backend down: frame-aware splicing, bounded per-client queues
// with evict, drop and pause policies, global memory guards and keepalive.
//
// It is configured only through SLUICE_* environment variables; see
// config.example.env. `sluice demo` runs a self-contained demonstration,
// `sluice check` validates the environment without starting, and
// `sluice version` names the build.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/KimMachineGun/automemlimit/memlimit"
	"github.com/caarlos0/env/v11"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/demo"
	"github.com/sluice-proxy/sluice/serve"
	"github.com/sluice-proxy/sluice/version"
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
			return demo.Run(ctx, args[1:], environ, stdout, stderr)
		case "check":
			return check(args[1:], environ, stdout)
		case "version", "-version", "--version":
			return printVersion(args[1:], stdout)
		case "-h", "-help", "--help", "help":
			fmt.Fprintln(stdout, usage)
			return nil
		default:
			return fmt.Errorf("unknown command %q\n%s", args[0], usage)
		}
	}
	cfg, err := config.Load(environ)
	if err != nil {
		return err
	}
	log := cfg.Logger(stderr)
	for _, w := range cfg.Warnings() {
		log.Warn().Msg(w)
	}
	// GOMEMLIMIT from the cgroup (90% of it), unless set explicitly: the
	// global queue ceiling is a share of it.
	if _, err := memlimit.Set(); err != nil {
		log.Debug().Err(err).Msg("no cgroup memory limit found")
	}
	return serve.Run(ctx, cfg, log, nil)
}

const usage = `usage: sluice          run the proxy (configured by SLUICE_* variables, see config.example.env)
       sluice check    validate the SLUICE_* variables and exit: 0 if sluice would start, 1 if not
       sluice version  print the version, the commit and the Go release it was built from (also -version, --version)
       sluice demo     run a built-in backend, sluice and a fleet of fast and slow clients`

// check is `sluice check`, as `nginx -t` or `haproxy -c`: it loads the
// configuration and maps it to the proxy's options, as a start does, and
// returns the same error a failed start prints; it opens no socket. On
// success it prints the warnings a start would log (the host's limits
// included) and "configuration ok".
func check(args []string, environ map[string]string, stdout io.Writer) error {
	if len(args) > 0 {
		return fmt.Errorf("check: unexpected argument %q (it reads only SLUICE_* variables)", args[0])
	}
	cfg, err := config.Load(environ)
	if err != nil {
		return err
	}
	if _, err := cfg.ProxyOptions(zerolog.Nop(), nil); err != nil {
		return err
	}
	for _, w := range append(cfg.Warnings(), serve.HostLimitWarnings(cfg)...) {
		fmt.Fprintln(stdout, "warning:", w)
	}
	fmt.Fprintln(stdout, "sluice: configuration ok")
	return nil
}

// printVersion is `sluice version`: the version and commit stamped at
// build time (build.sh, deploy/Dockerfile), else the go command's record.
func printVersion(args []string, stdout io.Writer) error {
	if len(args) > 0 {
		return fmt.Errorf("version: unexpected argument %q", args[0])
	}
	fmt.Fprintln(stdout, version.Get())
	return nil
}
