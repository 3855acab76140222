#!/usr/bin/env bash
# HTTP/2 downstream (h2c prior knowledge), HTTP/1.1 upstream: halo vs
# HAProxy vs nginx, each alone on CPU 0 with one worker (configs of
# bench/compare.sh, HAProxy `proto h2`, nginx `http2`); h2load on CPU 1
# with 64 connections x 10 streams, interleaved rounds; requests/s and CPU
# per request from /proc/PID/stat.
#
# Usage: bench/h2.sh [ROUNDS] [SECONDS]   (defaults 5, 5)   Env: OUT=bench/out BASE=19400
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-5}
DUR=${2:-5}
BASE=${BASE:-19400}

source bench/common.sh
bench_need haproxy:haproxy nginx:nginx-light h2load:nghttp2-client curl:curl
bench_build
bench_backends h2-backends 1
H2=1 bench_proxies 0
bench_wait_up $B1 $B2 $B3 $P_HALO
for port in $P_HAPROXY $P_NGINX; do
  for _ in $(seq 100); do
    curl -sf --http2-prior-knowledge -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.05
  done
done

RESULTS=$OUT/h2.tsv
echo -e "round\ttarget\trps\tcpu_us_per_req\tfailed" > "$RESULTS"
measure() { # round name port pid
  local round=$1 name=$2 port=$3 pid=$4 before out after
  before=$(cpu_ticks "$pid")
  out=$(taskset -c 1 h2load -c 64 -m 10 -D "$DUR" "http://127.0.0.1:$port/" 2>&1)
  after=$(cpu_ticks "$pid")
  python3 - "$round" "$name" "$before" "$after" "$TICK" <<PY >> "$RESULTS"
import re, sys
round_, name, before, after, tick = sys.argv[1:]
out = """$out"""
m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
if not m or not rps:
    sys.exit(f"unreadable h2load output for {name}:\n{out}")
done, ok, failed, errored = map(int, m.groups())
cpu = (int(after) - int(before)) * 1e6 / int(tick) / max(done, 1)
print(f"{round_}\t{name}\t{float(rps.group(1)):.0f}\t{cpu:.1f}\t{failed + errored}")
PY
}
bench_interleave measure

python3 - "$RESULTS" <<'PY' | tee "$OUT/h2.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
med = lambda t, k: statistics.median(float(r[k]) for r in rows if r["target"] == t)
rng = lambda t, k: (min(float(r[k]) for r in rows if r["target"] == t), max(float(r[k]) for r in rows if r["target"] == t))
print("| target | req/s | CPU us/req | failed | req/s vs HAProxy | CPU/req vs HAProxy |")
print("| --- | --- | --- | --- | --- | --- |")
for t in ("halo", "haproxy", "nginx"):
    lo, hi = rng(t, "rps"); clo, chi = rng(t, "cpu_us_per_req")
    print(f"| {t} | {med(t, 'rps'):.0f} ({lo:.0f}-{hi:.0f}) | {med(t, 'cpu_us_per_req'):.1f} ({clo:.1f}-{chi:.1f}) | {sum(int(r['failed']) for r in rows if r['target'] == t)} | "
          f"{med(t, 'rps') / med('haproxy', 'rps'):.2f}x | {med(t, 'cpu_us_per_req') / med('haproxy', 'cpu_us_per_req'):.2f}x |")
PY
