#!/bin/sh
# Builds and runs one of the Go floor peers in this directory (gotunnel:
# accept, dial, io.Copy both ways; epollrelay: the same on descriptors it
# owns) from $PROXY_LISTEN to $BACKEND_ADDR, for the load harness:
#   go run ./integration/loadtest -compare 'cmd:sh integration/loadtest/peers/go.sh gotunnel,...'
set -eu
name=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
go build -o "$dir/$name" "./integration/loadtest/peers/$name"
"$dir/$name" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT INT TERM
wait $pid
