#!/bin/sh
# Runs Debian's HAProxy as a WebSocket proxy from $PROXY_LISTEN to
# $BACKEND_ADDR, in the foreground, for the load harness:
#   go run ./integration/loadtest -compare 'cmd:sh integration/loadtest/peers/haproxy.sh,...'
# Storm mode's variants (integration/loadtest/storm.go) set, for example:
#   HAPROXY_SERVER_OPTS='maxconn 64' HAPROXY_TIMEOUT_QUEUE=10s   the server's connection limit and queue
#   HAPROXY_FRONTEND_OPTS='rate-limit sessions 500'              new sessions per second
set -eu
server_opts=${HAPROXY_SERVER_OPTS:-}
frontend_opts=${HAPROXY_FRONTEND_OPTS:-}
timeout_queue=${HAPROXY_TIMEOUT_QUEUE:+timeout queue $HAPROXY_TIMEOUT_QUEUE}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat >"$dir/haproxy.cfg" <<CONF
global
  maxconn 9800
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
  $timeout_queue
frontend ws
  bind $PROXY_LISTEN
  $frontend_opts
  default_backend backend
backend backend
  server b1 $BACKEND_ADDR $server_opts
CONF
haproxy -db -f "$dir/haproxy.cfg" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT INT TERM
wait $pid
