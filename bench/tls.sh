#!/usr/bin/env bash
# TLS termination: halo vs HAProxy vs nginx, each alone on CPU 0 with one
# worker, the same ECDSA P-256 certificate, TLS 1.3 with
# TLS_AES_128_GCM_SHA256 and X25519 (the client offers only those), HTTP/1.1
# to the bench backends (keep-alive upstream, round robin). Load on CPU 1,
# interleaved rounds, medians:
#   handshakes: `ab` without keep-alive, a full handshake per request (no
#               session resumption), 32 at a time;
#   requests:   wrk over kept-alive HTTPS connections (64).
# CPU per handshake/request is the proxy process's, from /proc/PID/stat.
#
# Usage: bench/tls.sh [ROUNDS] [SECONDS]   (defaults 5, 5)   Env: OUT=bench/out BASE=19600
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-5}
DUR=${2:-5}
OUT=${OUT:-bench/out}
BASE=${BASE:-19600}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

source bench/common.sh
bench_need haproxy:haproxy nginx:nginx-light wrk:wrk ab:apache2-utils openssl:openssl curl:curl
bench_build
bench_backends tls-backends 1

P_HALO=$((BASE + 10)); P_HAPROXY=$((BASE + 11)); P_NGINX=$((BASE + 12))
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 -subj "/CN=bench.test" \
  -addext "subjectAltName=DNS:bench.test,IP:127.0.0.1" -keyout "$OUT/tls.key" -out "$OUT/tls.crt" 2>/dev/null
cat "$OUT/tls.crt" "$OUT/tls.key" > "$OUT/tls.pem"

cat > "$OUT/halo-tls.toml" <<CONF
[proxy]
workers = 1
[[listeners]]
name = "tls"
listen = "127.0.0.1:$P_HALO"
protocol = "https"
[listeners.tls]
certificates = [{ cert = "$OUT/tls.crt", key = "$OUT/tls.key" }]
[[routes]]
upstream = "b"
[upstreams.b]
endpoints = ["127.0.0.1:$B1", "127.0.0.1:$B2", "127.0.0.1:$B3"]
[upstreams.b.health]
type = "tcp"
interval = "2s"
CONF
HALO_LOG=warn taskset -c 0 "$HALO" proxy -c "$OUT/halo-tls.toml" > "$OUT/halo-tls.out" &
HALO_PID=$!; PIDS+=($HALO_PID)

cat > "$OUT/haproxy-tls.cfg" <<CONF
global
  nbthread 1
  maxconn 8000
  tune.ssl.default-dh-param 2048
defaults
  mode http
  timeout connect 3s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:$P_HAPROXY ssl crt $OUT/tls.pem alpn http/1.1
  default_backend be
  option forwardfor
backend be
  balance roundrobin
  server s1 127.0.0.1:$B1 check inter 2s
  server s2 127.0.0.1:$B2 check inter 2s
  server s3 127.0.0.1:$B3 check inter 2s
CONF
taskset -c 0 haproxy -db -f "$OUT/haproxy-tls.cfg" > "$OUT/haproxy-tls.out" 2>&1 &
HAPROXY_PID=$!; PIDS+=($HAPROXY_PID)

cat > "$OUT/nginx-tls.conf" <<CONF
worker_processes 1;
daemon off;
master_process off;
pid $OUT/nginx-tls.pid;
error_log $OUT/nginx-tls.err warn;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream b {
    server 127.0.0.1:$B1;
    server 127.0.0.1:$B2;
    server 127.0.0.1:$B3;
    keepalive 256;
  }
  server {
    listen 127.0.0.1:$P_NGINX ssl;
    ssl_certificate $OUT/tls.crt;
    ssl_certificate_key $OUT/tls.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://b;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
CONF
taskset -c 0 nginx -c "$OUT/nginx-tls.conf" -p "$OUT" &
NGINX_PID=$!; PIDS+=($NGINX_PID)

for port in $P_HALO $P_HAPROXY $P_NGINX; do
  for _ in $(seq 100); do
    curl -sfk -o /dev/null "https://127.0.0.1:$port/" && break
    sleep 0.05
  done
  curl -sfk -o /dev/null "https://127.0.0.1:$port/" || { echo "port $port did not come up" >&2; exit 1; }
done
# The negotiated parameters, once per target, for the record.
for port in $P_HALO $P_HAPROXY $P_NGINX; do
  echo | openssl s_client -connect 127.0.0.1:$port -tls1_3 -ciphersuites TLS_AES_128_GCM_SHA256 -groups X25519 2>/dev/null \
    | awk -v p=$port '/^New, / {print "port " p ": " $0}'
done

# OpenSSL's client settings for ab and wrk: TLS 1.3, one suite, one group.
cat > "$OUT/openssl-client.cnf" <<CONF
openssl_conf = conf
[conf]
ssl_conf = ssl
[ssl]
system_default = sys
[sys]
MinProtocol = TLSv1.3
Ciphersuites = TLS_AES_128_GCM_SHA256
Groups = X25519
CONF

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
RESULTS=$OUT/tls.tsv
echo -e "round\tkind\ttarget\trate\tcpu_us_per_op\tfailed" > "$RESULTS"
for round in $(seq "$ROUNDS"); do
  order=("halo $P_HALO $HALO_PID" "haproxy $P_HAPROXY $HAPROXY_PID" "nginx $P_NGINX $NGINX_PID")
  for k in 0 1 2; do
    read -r name port pid <<< "${order[$(( (k + round) % 3 ))]}"
    # Handshakes: a new TLS connection per request.
    before=$(cpu_ticks "$pid")
    out=$(OPENSSL_CONF=$OUT/openssl-client.cnf taskset -c 1 ab -q -t "$DUR" -n 10000000 -c 32 "https://127.0.0.1:$port/" 2>&1 | tail -40 || true)
    python3 bench/rows.py ab "$round" handshakes "$name" "$before" "$(cpu_ticks "$pid")" "$TICK" <<< "$out" >> "$RESULTS"
    # Requests over kept-alive TLS connections.
    before=$(cpu_ticks "$pid")
    out=$(OPENSSL_CONF=$OUT/openssl-client.cnf taskset -c 1 wrk -t1 -c64 -d"${DUR}s" "https://127.0.0.1:$port/" 2>&1)
    python3 bench/rows.py wrk "$round" requests "$name" "$before" "$(cpu_ticks "$pid")" "$TICK" <<< "$out" >> "$RESULTS"
  done
  echo "round $round done" >&2
done

python3 bench/rows.py summary "$RESULTS" "handshakes=Full handshakes per second=handshake" \
  "requests=Requests per second over kept-alive connections=request" | tee "$OUT/tls.md"
