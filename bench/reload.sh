#!/usr/bin/env bash
# Reload cost of a large proxy file under load: 1,000 host routes and 1,000
# upstreams of 10 endpoints (health checks off) plus a catch-all route to
# three nginx backends; wrk with 64 connections on the catch-all for
# ROUNDS x 10 s without reloads and with `POST /reload` every 500 ms,
# interleaved. Prints each reload's time and the p99s.
#
# Usage: bench/reload.sh [ROUNDS]   (default 3)   Env: OUT=bench/out BASE=19600
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
BASE=${BASE:-19600}

source bench/common.sh
bench_need nginx:nginx-light wrk:wrk curl:curl
bench_build
bench_backends reload-backends 1
ADMIN=$((BASE + 9)); P=$((BASE + 10))
python3 - "$OUT/reload.toml" "$ADMIN" "$P" "$B1" "$B2" "$B3" <<'PY'
import sys
path, admin, port, b1, b2, b3 = sys.argv[1:]
out = ["[proxy]", "workers = 1", "[admin]", f'listen = "127.0.0.1:{admin}"',
       "[[listeners]]", 'name = "main"', f'listen = "127.0.0.1:{port}"']
for i in range(1000):
    out += ["[[routes]]", f'name = "r{i}"', f'host = "h{i}.example"', f'upstream = "u{i}"']
out += ["[[routes]]", 'name = "bench"', 'upstream = "b"']
for i in range(1000):
    eps = ", ".join(f'"127.0.{(i * 10 + j) // 250 + 1}.{(i * 10 + j) % 250 + 1}:8080"' for j in range(10))
    out += [f"[upstreams.u{i}]", f"endpoints = [{eps}]", f"[upstreams.u{i}.health]", "enabled = false"]
out += ["[upstreams.b]", f'endpoints = ["127.0.0.1:{b1}", "127.0.0.1:{b2}", "127.0.0.1:{b3}"]']
open(path, "w").write("\n".join(out) + "\n")
PY
HALO_LOG=warn taskset -c 0 "$HALO" proxy -c "$OUT/reload.toml" > "$OUT/reload-halo.out" 2>&1 &
PIDS+=($!)
bench_wait_up $B1 $B2 $B3 $P

p99() { python3 -c "
import re, sys
t = open(sys.argv[1]).read()
v, u = re.match(r'([\d.]+)(us|ms|s)', re.search(r'99%\s+(\S+)', t).group(1)).groups()
print(float(v) * {'us': 0.001, 'ms': 1, 's': 1000}[u])" "$1"; }
: > "$OUT/reload-times.txt"
for round in $(seq "$ROUNDS"); do
  taskset -c 1 wrk -t1 -c64 -d10s --latency "http://127.0.0.1:$P/" > "$OUT/reload-quiet.txt"
  taskset -c 1 wrk -t1 -c64 -d10s --latency "http://127.0.0.1:$P/" > "$OUT/reload-busy.txt" &
  WRK=$!
  for _ in $(seq 18); do
    sleep 0.5
    curl -s -o /dev/null -w "%{time_total}\n" -X POST "http://127.0.0.1:$ADMIN/reload" >> "$OUT/reload-times.txt"
  done
  wait $WRK
  echo "round $round: p99 without reloads $(p99 "$OUT/reload-quiet.txt") ms, with a reload every 500 ms $(p99 "$OUT/reload-busy.txt") ms"
done
sort -n "$OUT/reload-times.txt" | awk '{a[NR]=$1} END {printf "reload time (s): median %s, max %s, n %d\n", a[int((NR+1)/2)], a[NR], NR}'
