#!/usr/bin/env bash
# A backend that hangs under load: halo vs HAProxy vs nginx.
#
# Three backends (each its own nginx process) on CPU 1 with the load
# generator; each proxy alone on CPU 0, configured as in bench/compare.sh
# (halo adds the default passive ejection). Per run: wrk with 64
# connections for 9 s; at 2 s one backend is frozen with SIGSTOP (its
# kernel still accepts connections, nothing answers) and thawed 5 s later.
# Reports requests, errors (wrk timeout 10 s, so a held request shows its
# whole wait), p99 and max latency; rounds interleave the proxies.
#
# Usage: bench/hung.sh [ROUNDS]   (default 3)   Env: OUT=bench/out BASE=19200
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
BASE=${BASE:-19200}

source bench/common.sh
bench_need haproxy:haproxy nginx:nginx-light wrk:wrk
bench_build
bench_backends_split hung-backends 1
HALO_EXTRA='[upstreams.b.outlier]' bench_proxies 0
bench_wait_up $B1 $B2 $B3 $P_HALO $P_HAPROXY $P_NGINX

RESULTS=$OUT/hung.tsv
echo -e "round\ttarget\trequests\terrors\tp99_ms\tmax_ms" > "$RESULTS"
run() { # round name port
  local round=$1 name=$2 port=$3 out
  taskset -c 1 wrk -t1 -c64 -d9s --timeout 10s --latency "http://127.0.0.1:$port/" > "$OUT/hung-wrk.txt" &
  local wrk=$!
  sleep 2
  kill -STOP "${BPIDS[0]}"
  sleep 5
  kill -CONT "${BPIDS[0]}"
  wait $wrk
  python3 - "$round" "$name" "$OUT/hung-wrk.txt" <<'PY' >> "$RESULTS"
import re, sys
round_, name, path = sys.argv[1:]
out = open(path).read()
def ms(v):
    n, u = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[u]
total = int(re.search(r"(\d+) requests in", out).group(1))
p99 = ms(re.search(r"99%\s+(\S+)", out).group(1))
mx = ms(re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out).group(1))
errs = sum(int(x) for x in re.findall(r"timeout (\d+)", out))
errs += sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
errs += sum(int(x) for x in re.findall(r"(?:connect|read|write) (\d+)", out))
print(f"{round_}\t{name}\t{total}\t{errs}\t{p99:.1f}\t{mx:.1f}")
PY
  # Let every proxy see the thawed backend healthy before the next run.
  sleep 3
}

for round in $(seq "$ROUNDS"); do
  order=("halo $P_HALO" "haproxy $P_HAPROXY" "nginx $P_NGINX")
  for k in 0 1 2; do
    # shellcheck disable=SC2086
    run "$round" ${order[$(( (k + round) % 3 ))]}
  done
  echo "round $round done" >&2
done

python3 - "$RESULTS" <<'PY' | tee "$OUT/hung.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print("| target | requests | failed | p99 ms | max latency ms |")
print("| --- | --- | --- | --- | --- |")
for t in ("halo", "haproxy", "nginx"):
    r = [x for x in rows if x["target"] == t]
    cell = lambda k, f: f"{f.format(statistics.median(float(x[k]) for x in r))} ({f.format(min(float(x[k]) for x in r))}-{f.format(max(float(x[k]) for x in r))})"
    print(f"| {t} | {cell('requests', '{:.0f}')} | {cell('errors', '{:.0f}')} | {cell('p99_ms', '{:.0f}')} | {cell('max_ms', '{:.0f}')} |")
PY
