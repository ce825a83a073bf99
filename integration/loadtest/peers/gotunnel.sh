#!/bin/sh
# Runs gotunnel (the floor of a Go TCP proxy: accept, dial, io.Copy both
# ways) from $PROXY_LISTEN to $BACKEND_ADDR, for the load harness:
#   go run ./integration/loadtest -compare 'cmd:sh integration/loadtest/peers/gotunnel.sh,...'
set -eu
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
go build -o "$dir/gotunnel" ./integration/loadtest/peers/gotunnel
"$dir/gotunnel" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT INT TERM
wait $pid
