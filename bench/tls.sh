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
BASE=${BASE:-19600}

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
$(bench_halo_upstream)
CONF
HALO_LOG=warn bench_start HALO_PID 0 "$HALO" proxy -c "$OUT/halo-tls.toml" > "$OUT/halo-tls.out"

cat > "$OUT/haproxy-tls.cfg" <<CONF
$(bench_haproxy_head http "tune.ssl.default-dh-param 2048")
frontend fe
  bind 127.0.0.1:$P_HAPROXY ssl crt $OUT/tls.pem alpn http/1.1
  default_backend be
  option forwardfor
$(bench_haproxy_backend)
CONF
bench_start HAPROXY_PID 0 haproxy -db -f "$OUT/haproxy-tls.cfg" > "$OUT/haproxy-tls.out" 2>&1

cat > "$OUT/nginx-tls.conf" <<CONF
$(bench_nginx_head nginx-tls)
http {
$(bench_nginx_http_upstream)
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
bench_start NGINX_PID 0 nginx -c "$OUT/nginx-tls.conf" -p "$OUT"

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

RESULTS=$OUT/tls.tsv
echo -e "round\tkind\ttarget\trate\tcpu_us_per_op\tfailed" > "$RESULTS"
measure() { # round name port pid
  local before out
  # Handshakes: a new TLS connection per request.
  before=$(cpu_ticks "$4")
  out=$(OPENSSL_CONF=$OUT/openssl-client.cnf taskset -c 1 ab -q -t "$DUR" -n 10000000 -c 32 "https://127.0.0.1:$3/" 2>&1 | tail -40 || true)
  python3 bench/rows.py ab "$1" handshakes "$2" "$before" "$(cpu_ticks "$4")" "$TICK" <<< "$out" >> "$RESULTS"
  # Requests over kept-alive TLS connections.
  before=$(cpu_ticks "$4")
  out=$(OPENSSL_CONF=$OUT/openssl-client.cnf taskset -c 1 wrk -t1 -c64 -d"${DUR}s" "https://127.0.0.1:$3/" 2>&1)
  python3 bench/rows.py wrk "$1" requests "$2" "$before" "$(cpu_ticks "$4")" "$TICK" <<< "$out" >> "$RESULTS"
}
bench_interleave measure

python3 bench/rows.py summary "$RESULTS" "handshakes=Full handshakes per second=handshake" \
  "requests=Requests per second over kept-alive connections=request" | tee "$OUT/tls.md"
