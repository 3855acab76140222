#!/usr/bin/env bash
# What idle keep-alive connections cost: halo vs HAProxy vs nginx.
#
# Each proxy (configured as in bench/compare.sh, one worker on CPU 0,
# started afresh every round) gets N connections that each send one
# request and then stay open; the proxy's RSS before and after gives the
# cost per connection, and a sample of the idle connections must still
# answer. Rounds interleave the proxies.
#
# halo's median is checked against IDLE_LIMIT bytes per connection (the
# last recorded figure plus a margin): past it the script says so and
# exits 2, so a change that makes idle connections cost more is seen.
#
# Usage: bench/idle.sh [ROUNDS] [N]   (defaults 3, 5000)
# Env: OUT=bench/out BASE=19300 IDLE_LIMIT=bytes
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
N=${2:-5000}
BASE=${BASE:-19300}
ulimit -n "$(ulimit -Hn)"

source bench/common.sh
bench_need haproxy:haproxy nginx:nginx-light wrk:wrk
bench_build
bench_backends idle-backends 1

RESULTS=$OUT/idle.tsv
echo -e "round\ttarget\tbefore_kb\tafter_kb\tper_conn_bytes\tanswering" > "$RESULTS"
for round in $(seq "$ROUNDS"); do
  # Fresh proxies every round: memory a process freed stays in its RSS.
  bench_proxies 0
  bench_wait_up $B1 $B2 $B3 $P_HALO $P_HAPROXY $P_NGINX
  order=("halo $P_HALO $HALO_PID" "haproxy $P_HAPROXY $HAPROXY_PID" "nginx $P_NGINX $NGINX_PID")
  for k in 0 1 2; do
    read -r name port pid <<< "${order[$(( (k + round) % 3 ))]}"
    read -r before after answering asked < <(taskset -c 1 python3 bench/idle.py "$port" "$pid" "$N")
    per=$(( (after - before) * 1024 / N ))
    echo -e "$round\t$name\t$before\t$after\t$per\t$answering/$asked" >> "$RESULTS"
    sleep 1
  done
  kill "$HALO_PID" "$HAPROXY_PID" "$NGINX_PID"
  wait "$HALO_PID" "$HAPROXY_PID" "$NGINX_PID" 2>/dev/null || true
  echo "round $round done" >&2
done

python3 - "$RESULTS" "$N" "${IDLE_LIMIT:-3200}" <<'PY' | tee "$OUT/idle.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
n = int(sys.argv[2])
print(f"| target | bytes per idle connection ({n}) | RSS after, MiB | idle connections answering |")
print("| --- | --- | --- | --- |")
for t in ("halo", "haproxy", "nginx"):
    r = [x for x in rows if x["target"] == t]
    per = [float(x["per_conn_bytes"]) for x in r]
    after = [float(x["after_kb"]) / 1024 for x in r]
    print(f"| {t} | {statistics.median(per):.0f} ({min(per):.0f}-{max(per):.0f}) | {statistics.median(after):.1f} | {', '.join(x['answering'] for x in r)} |")
halo = statistics.median(float(x["per_conn_bytes"]) for x in rows if x["target"] == "halo")
limit = float(sys.argv[3])
if halo > limit:
    print(f"\nREGRESSION: halo holds {halo:.0f} bytes per idle connection, over the limit of {limit:.0f} (IDLE_LIMIT)")
    sys.exit(2)
print(f"\nhalo within the limit: {halo:.0f} <= {limit:.0f} bytes per idle connection")
PY
