#!/bin/sh
# Runs Debian's HAProxy as a WebSocket proxy from $PROXY_LISTEN to
# $BACKEND_ADDR, in the foreground, for the load harness:
#   go run ./integration/loadtest -compare 'cmd:sh integration/loadtest/peers/haproxy.sh,...'
set -eu
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
frontend ws
  bind $PROXY_LISTEN
  default_backend backend
backend backend
  server b1 $BACKEND_ADDR
CONF
haproxy -db -f "$dir/haproxy.cfg" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT INT TERM
wait $pid
