#!/usr/bin/env bash
# Side-by-side HTTP load-balancer benchmark: halo vs HAProxy vs nginx.
#
# Three identical backends (one nginx worker answering a small body) and the
# load generator (wrk) run on CPU 1; each proxy runs alone on CPU 0 with one
# worker thread. Rounds interleave the proxies so machine noise hits them all
# alike; the report gives medians and min-max over the rounds, plus the
# no-proxy ceiling (wrk straight to one backend).
#
# Same work on every proxy: keep-alive on both sides, round robin over the
# three backends, TCP health checks every 2 s, and the request headers halo
# adds by default (X-Forwarded-For/-Proto/-Host, X-Request-ID; nginx and
# halo also add Forwarded, which HAProxy 2.6 cannot).
#
# Usage: bench/compare.sh [ROUNDS] [SECONDS]   (defaults: 5 rounds, 5 s each)
# Env:   CONNS="64 256"  OUT=bench/out
# All traffic stays on 127.0.0.1; everything started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-5}
DUR=${2:-5}
CONNS=${CONNS:-"64 256"}
PROXY_CPU=0
LOAD_CPU=1
BASE=${BASE:-19000}

source bench/common.sh
bench_need haproxy:haproxy nginx:nginx-light wrk:wrk
bench_build

P_HALO=$((BASE + 10)); P_HAPROXY=$((BASE + 11)); P_NGINX=$((BASE + 12))
for port in $B1 $B2 $B3 $P_HALO $P_HAPROXY $P_NGINX; do
  if (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "port $port is already in use; stop what holds it or set BASE=<another base port>" >&2
    exit 1
  fi
done

# --- backends: one nginx worker, three ports, identical 13-byte answers
bench_backends backends $LOAD_CPU

bench_proxies $PROXY_CPU

bench_wait_up $B1 $B2 $B3 $P_HALO $P_HAPROXY $P_NGINX

# Busy ticks of the proxy's CPU, softirq included: loopback packet handling
# runs there and is not charged to any process.
core_ticks() { awk -v c="cpu$PROXY_CPU" '$1 == c {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

RESULTS=$OUT/results.tsv
echo -e "round\tconns\ttarget\trps\tp50_ms\tp99_ms\tcpu_us_per_req\tcore_us_per_req\trss_kb" > "$RESULTS"

run() { # round conns name port pid
  local round=$1 conns=$2 name=$3 port=$4 pid=$5
  local before=0 after=0 core_before core_after
  [ "$pid" != "-" ] && before=$(cpu_ticks "$pid")
  core_before=$(core_ticks)
  local out
  out=$(taskset -c $LOAD_CPU wrk -t1 -c"$conns" -d"${DUR}s" --latency "http://127.0.0.1:$port/")
  if [ "$pid" != "-" ] && ! kill -0 "$pid" 2>/dev/null; then
    echo "error: $name (pid $pid) died during the run" >&2
    exit 1
  fi
  [ "$pid" != "-" ] && after=$(cpu_ticks "$pid")
  core_after=$(core_ticks)
  local rss="-"
  [ "$pid" != "-" ] && rss=$(rss_kb "$pid")
  python3 - "$round" "$conns" "$name" "$before" "$after" "$TICK" "$rss" "$DUR" "$core_before" "$core_after" <<PY >> "$RESULTS"
import re, sys
round_, conns, name, before, after, tick, rss, dur, cb, ca = sys.argv[1:]
out = """$out"""
def ms(v):
    n, u = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[u]
try:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = ms(re.search(r"50%\s+(\S+)", out).group(1))
    p99 = ms(re.search(r"99%\s+(\S+)", out).group(1))
    total = float(re.search(r"(\d+) requests in", out).group(1))
except (AttributeError, ValueError):
    print(f"error: {name} c={conns}: unreadable wrk output:\n{out}", file=sys.stderr)
    sys.exit(1)
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
if errs or "Socket errors" in out:
    print(f"warning: {name} c={conns}: errors in wrk output", file=sys.stderr)
cpu = core = "-"
if name != "direct":
    cpu = f"{(int(after) - int(before)) * 1e6 / int(tick) / total:.2f}"
    core = f"{(int(ca) - int(cb)) * 1e6 / int(tick) / total:.2f}"
print(f"{round_}\t{conns}\t{name}\t{rps:.0f}\t{p50:.3f}\t{p99:.3f}\t{cpu}\t{core}\t{rss}")
PY
}

for round in $(seq "$ROUNDS"); do
  for conns in $CONNS; do
    # Rotate the order every round so no proxy always runs first.
    order=("halo $P_HALO $HALO_PID" "haproxy $P_HAPROXY $HAPROXY_PID" "nginx $P_NGINX $NGINX_PID" "direct $B1 -")
    for k in $(seq 0 3); do
      idx=$(( (k + round) % 4 ))
      # shellcheck disable=SC2086
      run "$round" "$conns" ${order[$idx]}
    done
  done
  echo "round $round done" >&2
done

python3 - "$RESULTS" <<'PY' | tee "$OUT/summary.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
def vals(conns, target, key):
    return [float(r[key]) for r in rows if r["conns"] == conns and r["target"] == target and r[key] != "-"]
def cell(v, fmt):
    if not v:
        return "-"
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"
print("| conns | target | req/s | p50 ms | p99 ms | process CPU us/req | core CPU us/req | RSS MiB | req/s vs HAProxy | CPU/req vs HAProxy | p99 vs HAProxy |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for conns in sorted({r["conns"] for r in rows}, key=int):
    base = {k: statistics.median(vals(conns, "haproxy", k) or [float("nan")]) for k in ("rps", "cpu_us_per_req", "p99_ms")}
    for target in ("halo", "haproxy", "nginx", "direct"):
        rps, p50, p99 = vals(conns, target, "rps"), vals(conns, target, "p50_ms"), vals(conns, target, "p99_ms")
        cpu, rss = vals(conns, target, "cpu_us_per_req"), [x / 1024 for x in vals(conns, target, "rss_kb")]
        core = vals(conns, target, "core_us_per_req")
        ratio = lambda v, k, f="{:.2f}x": f.format(statistics.median(v) / base[k]) if v and target != "direct" else "-"
        print(f"| {conns} | {target} | {cell(rps, '{:.0f}')} | {cell(p50, '{:.2f}')} | {cell(p99, '{:.2f}')} | "
              f"{cell(cpu, '{:.1f}')} | {cell(core, '{:.1f}')} | {cell(rss, '{:.1f}')} | {ratio(rps, 'rps')} | {ratio(cpu, 'cpu_us_per_req')} | {ratio(p99, 'p99_ms')} |")
PY
echo "raw rows: $RESULTS" >&2
