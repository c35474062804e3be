#!/bin/sh
# HAProxy (TCP mode) as the peer proxy of a benchmark: `perf tcp --other` starts it with the
# backend address filled in, e.g.
#   --other haproxy=127.0.0.1:7902='scripts/haproxy-peer.sh tcp 127.0.0.1:7902 {echo}'
# It runs in the foreground (-db) with a throwaway config and stops when the harness sends it
# SIGTERM. HAProxy proxies no UDP, so `udp` is refused.
# HAPROXY_THREADS: threads (default: one per CPU, HAProxy's own default).
# HAPROXY_SPLICE=1: `option splice-auto` (splice(2) through pipes; off by default, as in
# HAProxy's own defaults).
# Install: apt-get install haproxy
set -eu
proto=$1 listen=$2 upstream=$3
command -v haproxy >/dev/null || { echo "haproxy-peer: haproxy is not installed (apt-get install haproxy)" >&2; exit 1; }
case $proto in
  tcp) ;;
  udp) echo "haproxy-peer: HAProxy has no UDP proxy; use it for 'perf tcp' only" >&2; exit 2 ;;
  *) echo "haproxy-peer: protocol must be tcp, not $proto" >&2; exit 2 ;;
esac
# No maxconn: HAProxy derives it from the descriptor limit it finds.
global=""
[ -n "${HAPROXY_THREADS:-}" ] && global="nbthread $HAPROXY_THREADS"
splice=""
[ "${HAPROXY_SPLICE:-0}" = 1 ] && splice="option splice-auto"
dir=$(mktemp -d /tmp/haproxy-peer.XXXXXX)
cat > "$dir/haproxy.cfg" <<CONF
global
  $global
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  ${splice}
frontend peer
  bind $listen
  default_backend upstream
backend upstream
  server upstream $upstream
CONF
exec haproxy -db -f "$dir/haproxy.cfg"
