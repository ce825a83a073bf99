#!/bin/sh
# Runs epollrelay (gotunnel on descriptors it owns in its own epoll sets,
# without Go's net package) from $PROXY_LISTEN to $BACKEND_ADDR, for the
# load harness:
#   go run ./integration/loadtest -compare 'cmd:sh integration/loadtest/peers/epollrelay.sh,...'
set -eu
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
go build -o "$dir/epollrelay" ./integration/loadtest/peers/epollrelay
"$dir/epollrelay" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT INT TERM
wait $pid
