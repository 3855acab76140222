#!/usr/bin/env bash
# Where halo's time goes: halo alone on CPU 0 (one worker, the config of
# bench/compare.sh) over three nginx backends, under wrk (HTTP/1.1, 64
# connections) or h2load (h2c, 64 connections x 10 streams) on CPU 1,
# sampled with `perf record`; prints the top symbols by self time.
#
# Usage: bench/profile.sh [h1|h2] [SECONDS]   (defaults h1, 8)   Env: OUT=bench/out BASE=19500
set -euo pipefail
cd "$(dirname "$0")/.."

PROTO=${1:-h1}
DUR=${2:-8}
BASE=${BASE:-19500}

source bench/common.sh
bench_need perf:linux-perf wrk:wrk h2load:nghttp2-client nginx:nginx-light haproxy:haproxy
bench_build
bench_backends prof-backends 1
bench_proxies 0
bench_wait_up $B1 $B2 $B3 $P_HALO
perf record -F 999 -g -p "$HALO_PID" -o "$OUT/perf-$PROTO.data" 2>/dev/null &
PERF=$!
sleep 0.5
if [ "$PROTO" = h2 ]; then
  taskset -c 1 h2load -c 64 -m 10 -D "$DUR" "http://127.0.0.1:$P_HALO/" | grep -E "req/s|requests:"
else
  taskset -c 1 wrk -t1 -c64 -d"${DUR}s" "http://127.0.0.1:$P_HALO/" | grep -E "Requests/sec"
fi
kill -INT $PERF
wait $PERF || true
perf report -i "$OUT/perf-$PROTO.data" --no-children --sort dso,symbol --stdio 2>/dev/null \
  | grep -E '^ +[0-9.]+%' | head -30 | tee "$OUT/profile-$PROTO.txt"
