#!/bin/sh
# Runs Debian's nginx as a WebSocket proxy from $PROXY_LISTEN to
# $BACKEND_ADDR, in the foreground, for the load harness:
#   go run ./integration/loadtest -compare 'cmd:sh integration/loadtest/peers/nginx.sh,...'
set -eu
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat >"$dir/nginx.conf" <<CONF
worker_processes auto;
worker_rlimit_nofile 65536;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 30000; }
http {
  access_log off;
  client_body_temp_path $dir; proxy_temp_path $dir; fastcgi_temp_path $dir;
  uwsgi_temp_path $dir; scgi_temp_path $dir;
  server {
    listen $PROXY_LISTEN;
    location / {
      proxy_pass http://$BACKEND_ADDR;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }
  }
}
CONF
nginx -c "$dir/nginx.conf" -e "$dir/error.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT INT TERM
wait $pid
