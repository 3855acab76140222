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
OUT=${OUT:-bench/out}
BASE=${BASE:-19700}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

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
taskset -c 1 nginx -c "$OUT/tcp-backends.conf" -p "$OUT" &
PIDS+=($!)

P_HALO=$((BASE + 10)); P_HAPROXY=$((BASE + 11)); P_NGINX=$((BASE + 12))
cat > "$OUT/halo-tcp.toml" <<CONF
[proxy]
workers = 1
[[listeners]]
name = "tcp"
listen = "127.0.0.1:$P_HALO"
protocol = "tcp"
upstream = "b"
[upstreams.b]
endpoints = ["127.0.0.1:$B1", "127.0.0.1:$B2", "127.0.0.1:$B3"]
[upstreams.b.health]
type = "tcp"
interval = "2s"
CONF
HALO_LOG=warn taskset -c 0 "$HALO" proxy -c "$OUT/halo-tcp.toml" > "$OUT/halo-tcp.out" &
HALO_PID=$!; PIDS+=($HALO_PID)

cat > "$OUT/haproxy-tcp.cfg" <<CONF
global
  nbthread 1
  maxconn 8000
defaults
  mode tcp
  timeout connect 3s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:$P_HAPROXY
  default_backend be
backend be
  balance roundrobin
  server s1 127.0.0.1:$B1 check inter 2s
  server s2 127.0.0.1:$B2 check inter 2s
  server s3 127.0.0.1:$B3 check inter 2s
CONF
taskset -c 0 haproxy -db -f "$OUT/haproxy-tcp.cfg" > "$OUT/haproxy-tcp.out" 2>&1 &
HAPROXY_PID=$!; PIDS+=($HAPROXY_PID)

cat > "$OUT/nginx-tcp.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
master_process off;
pid $OUT/nginx-tcp.pid;
error_log $OUT/nginx-tcp.err warn;
events { worker_connections 16384; }
stream {
  upstream b {
    server 127.0.0.1:$B1;
    server 127.0.0.1:$B2;
    server 127.0.0.1:$B3;
  }
  server { listen 127.0.0.1:$P_NGINX; proxy_pass b; }
}
CONF
taskset -c 0 nginx -c "$OUT/nginx-tcp.conf" -p "$OUT" &
NGINX_PID=$!; PIDS+=($NGINX_PID)

bench_wait_up $B1 $P_HALO $P_HAPROXY $P_NGINX

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
RESULTS=$OUT/tcp.tsv
echo -e "round\tkind\ttarget\trate\tcpu_us_per_op\tfailed" > "$RESULTS"
for round in $(seq "$ROUNDS"); do
  order=("halo $P_HALO $HALO_PID" "haproxy $P_HAPROXY $HAPROXY_PID" "nginx $P_NGINX $NGINX_PID")
  for k in 0 1 2; do
    read -r name port pid <<< "${order[$(( (k + round) % 3 ))]}"
    before=$(cpu_ticks "$pid")
    out=$(taskset -c 1 ab -q -t "$DUR" -n 10000000 -c 32 "http://127.0.0.1:$port/" 2>&1 | tail -40 || true)
    python3 bench/rows.py ab "$round" connections "$name" "$before" "$(cpu_ticks "$pid")" "$TICK" <<< "$out" >> "$RESULTS"
    before=$(cpu_ticks "$pid")
    out=$(taskset -c 1 wrk -t1 -c8 -d"${DUR}s" "http://127.0.0.1:$port/big" 2>&1)
    python3 bench/rows.py wrk "$round" throughput "$name" "$before" "$(cpu_ticks "$pid")" "$TICK" mib <<< "$out" >> "$RESULTS"
  done
  echo "round $round done" >&2
done

python3 bench/rows.py summary "$RESULTS" "connections=New connections per second (one request each)=connection" \
  "throughput=MiB/s (1 MiB bodies)=MiB" | tee "$OUT/tcp.md"
