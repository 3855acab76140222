#!/usr/bin/env bash
# Overload: backends of fixed capacity at half and at 4x their capacity,
# halo against HAProxy and nginx, each set to shed what the backends cannot
# take.
#
# Three backends (`halo demo-app --workers 4 --delay-ms 40`: 4 requests at
# a time, 40 ms each, so 100 requests/s each and 300 for the three) and
# the open-loop client (bench/openloop.py: requests start at a fixed rate
# whatever the answers do; latency from when each was due) on CPU 1; each
# proxy alone on CPU 0, one worker:
#   halo          [upstreams.b] max_in_flight = 12: a 503 at once past it
#   halo-auto     max_in_flight = "auto": the limit adapts to the latency
#   haproxy       server maxconn 4, timeout queue 1s (a bounded wait, then 503)
#   haproxy-q50   server maxconn 4, timeout queue 50ms
#   nginx         server max_conns=4 (a 502 at once when every server is full)
# Per run: 10 s at RATE; rounds interleave the proxies. Reports, per proxy
# and load, the medians over rounds of the admitted requests' p50 and p99,
# the goodput and the share shed.
#
# Usage: bench/overload.sh [ROUNDS]   (default 3)   Env: OUT=bench/out BASE=19400
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
BASE=${BASE:-19400}
SECONDS_PER_RUN=10
CAPACITY=300

source bench/common.sh
bench_need haproxy:haproxy nginx:nginx-light python3:python3
bench_build

for port in $B1 $B2 $B3; do
  HALO_LOG=warn bench_start PID_ 1 "$HALO" demo-app --port "$port" --workers 4 --delay-ms 40 2>/dev/null
done

P_HALO=$((BASE + 10)); P_HAPROXY=$((BASE + 11)); P_HAPROXY_Q=$((BASE + 12)); P_NGINX=$((BASE + 13))
P_HALO_AUTO=$((BASE + 14))
bench_halo_file "$P_HALO" 'max_in_flight = 12' > "$OUT/overload-halo.toml"
HALO_LOG=warn bench_start PID_ 0 "$HALO" proxy -c "$OUT/overload-halo.toml" > "$OUT/overload-halo.out"
bench_halo_file "$P_HALO_AUTO" 'max_in_flight = "auto"' > "$OUT/overload-halo-auto.toml"
HALO_LOG=warn bench_start PID_ 0 "$HALO" proxy -c "$OUT/overload-halo-auto.toml" > "$OUT/overload-halo-auto.out"

haproxy_cfg() { # PORT QUEUE_TIMEOUT
  bench_haproxy_head http
  printf '  timeout queue %s\n' "$2"
  printf 'frontend fe\n  bind 127.0.0.1:%s\n  default_backend be\n' "$1"
  printf 'backend be\n  balance leastconn\n'
  printf '  server s%s 127.0.0.1:%s check inter 2s maxconn 4\n' 1 $B1 2 $B2 3 $B3
}
haproxy_cfg $P_HAPROXY 1s > "$OUT/overload-haproxy.cfg"
haproxy_cfg $P_HAPROXY_Q 50ms > "$OUT/overload-haproxy-q50.cfg"
bench_start PID_ 0 haproxy -db -f "$OUT/overload-haproxy.cfg" > "$OUT/overload-haproxy.out" 2>&1
bench_start PID_ 0 haproxy -db -f "$OUT/overload-haproxy-q50.cfg" > "$OUT/overload-haproxy-q50.out" 2>&1

cat > "$OUT/overload-nginx.conf" <<CONF
$(bench_nginx_head overload-nginx)
http {
  access_log off;
  keepalive_requests 1000000;
  upstream b {
    least_conn;
$(printf '    server 127.0.0.1:%s max_conns=4;\n' $B1 $B2 $B3)
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$P_NGINX;
    location / {
      proxy_pass http://b;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
bench_start PID_ 0 nginx -c "$OUT/overload-nginx.conf" -p "$OUT"
bench_wait_up $B1 $B2 $B3 $P_HALO $P_HALO_AUTO $P_HAPROXY $P_HAPROXY_Q $P_NGINX

RESULTS=$OUT/overload.jsonl
: > "$RESULTS"
TARGETS=("halo $P_HALO" "halo-auto $P_HALO_AUTO" "haproxy $P_HAPROXY" "haproxy-q50 $P_HAPROXY_Q" "nginx $P_NGINX")
for round in $(seq "$ROUNDS"); do
  for load in 0.5 4; do
    rate=$(python3 -c "print($CAPACITY * $load)")
    for k in 0 1 2 3 4; do
      read -r name port <<< "${TARGETS[$(( (k + round) % 5 ))]}"
      line=$(taskset -c 1 python3 bench/openloop.py "$port" "$rate" "$SECONDS_PER_RUN")
      echo "{\"round\": $round, \"target\": \"$name\", \"load\": $load, \"result\": $line}" >> "$RESULTS"
      sleep 1
    done
  done
  echo "round $round done" >&2
done

python3 - "$RESULTS" "$CAPACITY" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cap = int(sys.argv[2])
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")
print(f"backends' capacity {cap} requests/s; medians over {max(r['round'] for r in rows)} rounds")
print(f"{'load':>5} {'proxy':<12} {'p50 ms':>8} {'p99 ms':>8} {'p99/halo':>9} {'goodput/s':>10} {'shed':>7} {'errors':>7}")
for load in sorted({r["load"] for r in rows}):
    by = {}
    for r in rows:
        if r["load"] == load:
            by.setdefault(r["target"], []).append(r["result"])
    halo_p99 = med(x["admitted_p99_ms"] for x in by["halo"])
    for name in ["halo", "halo-auto", "haproxy", "haproxy-q50", "nginx"]:
        xs = by[name]
        p99 = med(x["admitted_p99_ms"] for x in xs)
        errs = med(sum(x["errors"].values()) for x in xs)
        print(f"{load:>4}x {name:<12} {med(x['admitted_p50_ms'] for x in xs):>8.1f} {p99:>8.1f} "
              f"{p99 / halo_p99:>8.2f}x {med(x['goodput_rps'] for x in xs):>10.1f} "
              f"{100 * med(x['shed_share'] for x in xs):>6.1f}% {errs:>7.0f}")
PY
