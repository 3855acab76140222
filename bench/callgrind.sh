#!/usr/bin/env bash
# Instructions per request of halo's user-space work, under callgrind:
# repeatable whatever else the machine does (instruction counts, not time).
# Usage: bench/callgrind.sh [SECONDS]   (needs valgrind, nginx, wrk: installed when missing)
# Prints total instructions, requests served and instructions per request,
# and leaves the profile in bench/out/callgrind.out for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."

DUR=${1:-8}
BASE=${BASE:-19100}

source bench/common.sh
bench_need valgrind:valgrind nginx:nginx-light wrk:wrk curl:curl
bench_build
ADMIN=$((BASE + 9)); P=$((BASE + 10))
bench_backends cg-backends 1

cat > "$OUT/cg-halo.toml" <<CONF
[proxy]
workers = 1
[admin]
listen = "127.0.0.1:$ADMIN"
[[listeners]]
name = "main"
listen = "127.0.0.1:$P"
[[routes]]
upstream = "b"
[upstreams.b]
policy = "round_robin"
endpoints = ["127.0.0.1:$B1", "127.0.0.1:$B2", "127.0.0.1:$B3"]
[upstreams.b.health]
type = "tcp"
interval = "2s"
CONF
rm -f "$OUT/callgrind.out"
HALO_LOG=warn taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
  "$HALO" proxy -c "$OUT/cg-halo.toml" > /dev/null 2> "$OUT/callgrind.err" &
VG=$!
PIDS+=($VG)
for _ in $(seq 1 100); do
  curl -s -o /dev/null "http://127.0.0.1:$ADMIN/healthz" && break
  sleep 0.2
done
taskset -c 1 wrk -t1 -c16 -d"${DUR}s" "http://127.0.0.1:$P/" > "$OUT/callgrind-wrk.txt"
n=$(curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '/^halo_route_requests_total/ {s += $2} END {print s}')
kill -TERM $VG
wait $VG || true
ir=$(callgrind_annotate "$OUT/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "instructions $ir requests $n instructions/request $((ir / n))"
