#!/usr/bin/env bash
# TCP (L4) forwarding: halo (protocol = "tcp") vs HAProxy (mode tcp) vs
# nginx (stream), each alone on CPU 0 with one worker, round robin over the
# same three nginx backends with TCP checks every 2 s. Load on CPU 1,
# interleaved rounds, medians:
#   connections: `ab` without keep-alive: a new client connection, and so a
#                new upstream connection, per request (32 at a time);
#   throughput:  wrk fetching a 1 MiB body over 8 kept-alive connections.
# CPU per connection / per MiB is the proxy process's, from /proc/PID/stat.
#
# Usage: bench/tcp.sh [ROUNDS] [SECONDS]   (defaults 5, 5)   Env: OUT=bench/out BASE=19700
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-5}
DUR=${2:-5}
BASE=${BASE:-19700}

source bench/common.sh
bench_need haproxy:haproxy nginx:nginx-light wrk:wrk ab:apache2-utils curl:curl
if [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnginx-mod-stream >/dev/null
fi
bench_build

head -c $((1 << 20)) /dev/zero > "$OUT/big.bin"
cat > "$OUT/tcp-backends.conf" <<CONF
worker_processes 1;
daemon off;
pid $OUT/tcp-backends.pid;
error_log $OUT/tcp-backends.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$B1; listen 127.0.0.1:$B2; listen 127.0.0.1:$B3;
    location / { return 200 "hello, world\n"; }
    location = /big { alias $OUT/big.bin; }
  }
}
CONF
bench_start BACKENDS_PID 1 nginx -c "$OUT/tcp-backends.conf" -p "$OUT"

P_HALO=$((BASE + 10)); P_HAPROXY=$((BASE + 11)); P_NGINX=$((BASE + 12))
cat > "$OUT/halo-tcp.toml" <<CONF
[proxy]
workers = 1
[[listeners]]
name = "tcp"
listen = "127.0.0.1:$P_HALO"
protocol = "tcp"
upstream = "b"
$(bench_halo_upstream)
CONF
HALO_LOG=warn bench_start HALO_PID 0 "$HALO" proxy -c "$OUT/halo-tcp.toml" > "$OUT/halo-tcp.out"

cat > "$OUT/haproxy-tcp.cfg" <<CONF
$(bench_haproxy_head tcp)
frontend fe
  bind 127.0.0.1:$P_HAPROXY
  default_backend be
$(bench_haproxy_backend)
CONF
bench_start HAPROXY_PID 0 haproxy -db -f "$OUT/haproxy-tcp.cfg" > "$OUT/haproxy-tcp.out" 2>&1

cat > "$OUT/nginx-tcp.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
$(bench_nginx_head nginx-tcp)
stream {
  upstream b {
$(bench_nginx_servers)
  }
  server { listen 127.0.0.1:$P_NGINX; proxy_pass b; }
}
CONF
bench_start NGINX_PID 0 nginx -c "$OUT/nginx-tcp.conf" -p "$OUT"

bench_wait_up $B1 $P_HALO $P_HAPROXY $P_NGINX

RESULTS=$OUT/tcp.tsv
echo -e "round\tkind\ttarget\trate\tcpu_us_per_op\tfailed" > "$RESULTS"
measure() { # round name port pid
  local before out
  before=$(cpu_ticks "$4")
  out=$(taskset -c 1 ab -q -t "$DUR" -n 10000000 -c 32 "http://127.0.0.1:$3/" 2>&1 | tail -40 || true)
  python3 bench/rows.py ab "$1" connections "$2" "$before" "$(cpu_ticks "$4")" "$TICK" <<< "$out" >> "$RESULTS"
  before=$(cpu_ticks "$4")
  out=$(taskset -c 1 wrk -t1 -c8 -d"${DUR}s" "http://127.0.0.1:$3/big" 2>&1)
  python3 bench/rows.py wrk "$1" throughput "$2" "$before" "$(cpu_ticks "$4")" "$TICK" mib <<< "$out" >> "$RESULTS"
}
bench_interleave measure

python3 bench/rows.py summary "$RESULTS" "connections=New connections per second (one request each)=connection" \
  "throughput=MiB/s (1 MiB bodies)=MiB" | tee "$OUT/tcp.md"
