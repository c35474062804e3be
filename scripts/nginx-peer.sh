#!/bin/sh
# nginx (stream module) as the peer proxy of a benchmark: `perf compare --other` and
# `perf tcp --other` start it with the echo/backend address filled in, e.g.
#   --other nginx=127.0.0.1:7900='scripts/nginx-peer.sh udp 127.0.0.1:7900 {echo}'
# It runs in the foreground with a throwaway config and stops when the harness kills it.
# Install: apt-get install nginx libnginx-mod-stream
set -eu
proto=$1 listen=$2 upstream=$3
workers=${NGINX_WORKERS:-auto}
module=/usr/lib/nginx/modules/ngx_stream_module.so
command -v nginx >/dev/null || { echo "nginx-peer: nginx is not installed (apt-get install nginx libnginx-mod-stream)" >&2; exit 1; }
[ -f "$module" ] || { echo "nginx-peer: no $module (apt-get install libnginx-mod-stream)" >&2; exit 1; }
dir=$(mktemp -d /tmp/nginx-peer.XXXXXX)
case $proto in
  # One session per client address, like udp-director; nginx's default (no
  # proxy_responses limit) keeps the session until proxy_timeout.
  udp) server="listen $listen udp reuseport; proxy_pass $upstream; proxy_timeout 30s;" ;;
  tcp) server="listen $listen reuseport; proxy_pass $upstream; tcp_nodelay on;" ;;
  *) echo "nginx-peer: protocol must be udp or tcp, not $proto" >&2; exit 2 ;;
esac
cat > "$dir/nginx.conf" <<CONF
load_module $module;
worker_processes $workers;
daemon off;
pid $dir/nginx.pid;
error_log stderr warn;
events { worker_connections 16384; }
stream { server { $server } }
CONF
exec nginx -p "$dir" -c "$dir/nginx.conf"
