#!/usr/bin/env bash
# Gray failure: what health checks miss. halo vs HAProxy vs nginx.
#
# Three backends (one nginx process, three ports) and the load generator
# on CPU 1; each proxy alone on CPU 0, configured as in bench/compare.sh;
# halo's route hedges (`hedge = "auto"`) and its upstream has the default
# outlier detection (failure rate on). Three scenarios:
#   slow:    the first backend delays 5% of its answers by 200 ms. Per
#            proxy, p99.9 latency (wrk -c32) against the same proxy with
#            healthy backends, and the upstream requests per client request
#            (nginx's stub_status over wrk's count) as extra upstream load.
#   errors:  under load, the first backend starts answering 10% of its
#            requests with 500: time until halo ejects it.
#   uniform: every backend answers 1% with 500 for UNIFORM_SECS: halo's
#            ejections in that time (should be none).
# HAProxy and nginx have neither hedging nor failure-rate ejection; they
# run the slow scenario the same way for comparison.
#
# Usage: bench/gray.sh [ROUNDS] [SECONDS]   (defaults 3, 10)
# Env: UNIFORM_SECS=120 (the target is 600) OUT=bench/out BASE=19400
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
DUR=${2:-10}
UNIFORM_SECS=${UNIFORM_SECS:-120}
BASE=${BASE:-19400}
ECHO_MOD=/usr/lib/nginx/modules/ngx_http_echo_module.so

source bench/common.sh
bench_need haproxy:haproxy nginx:nginx-light wrk:wrk
if [ ! -f "$ECHO_MOD" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnginx-mod-http-echo >/dev/null
fi
bench_build
P_STUB=$((BASE + 4)); P_ADMIN=$((BASE + 5))

# gray_backends MODE: (re)writes the backends' config for MODE (healthy,
# slow, errors, uniform) and starts them, or reloads them when running.
GRAY_PID=
gray_backends() {
  local mode=$1 b1='return 200 "hello, world\n";' rest='return 200 "hello, world\n";'
  case $mode in
    slow) b1='if ($gray) { rewrite ^ /slow last; } return 200 "hello, world\n";' ;;
    errors) b1='if ($gray) { return 500 "failed\n"; } return 200 "hello, world\n";' ;;
    uniform) b1='if ($one) { return 500 "failed\n"; } return 200 "hello, world\n";'; rest=$b1 ;;
  esac
  cat > "$OUT/gray-backends.conf" <<CONF
load_module $ECHO_MOD;
worker_processes 1;
daemon off;
pid $OUT/gray-backends.pid;
error_log $OUT/gray-backends.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  split_clients "\${request_id}" \$gray { $([ "$mode" = slow ] && echo 5% || echo 10%) 1; * 0; }
  split_clients "\${request_id}" \$one { 1% 1; * 0; }
  server { listen 127.0.0.1:$B1; location / { $b1 } location /slow { internal; echo_sleep 0.2; echo "hello, world"; } }
  server { listen 127.0.0.1:$B2; location / { $rest } }
  server { listen 127.0.0.1:$B3; location / { $rest } }
  server { listen 127.0.0.1:$P_STUB; location / { stub_status; } }
}
CONF
  if [ -z "$GRAY_PID" ]; then
    taskset -c 1 nginx -c "$OUT/gray-backends.conf" -p "$OUT" &
    GRAY_PID=$!
    PIDS+=($!)
  else
    kill -HUP "$GRAY_PID"
    sleep 0.5
  fi
}
upstream_requests() { curl -sf "http://127.0.0.1:$P_STUB/" | awk 'NR == 3 {print $3}'; }
ejections() { # of the first backend, by halo's metrics
  curl -sf "http://127.0.0.1:$P_ADMIN/metrics" |
    awk -v ep="endpoint=\"127.0.0.1:$B1\"" '/^halo_endpoint_ejections_total/ && index($0, ep) {print $2}' | head -1
}
all_ejections() {
  curl -sf "http://127.0.0.1:$P_ADMIN/metrics" | awk '/^halo_endpoint_ejections_total/ {s += $2} END {print s + 0}'
}

gray_backends healthy
HALO_ROUTE='retry = { hedge = "auto" }' \
  HALO_EXTRA=$(printf '[upstreams.b.outlier]\n[admin]\nlisten = "127.0.0.1:%s"\n' "$P_ADMIN") bench_proxies 0
bench_wait_up $B1 $B2 $B3 $P_HALO $P_HAPROXY $P_NGINX

cat > "$OUT/gray.lua" <<'LUA'
done = function(summary, latency, requests)
  io.write(string.format("GRAY %d %.3f %.3f %d\n", summary.requests, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000, summary.errors.status + summary.errors.timeout + summary.errors.read))
end
LUA

RESULTS=$OUT/gray.tsv
echo -e "round\tscenario\ttarget\trequests\tp99_ms\tp999_ms\terrors\tupstream_per_request" > "$RESULTS"
measure() { # round scenario name port
  local before after line
  before=$(upstream_requests)
  line=$(taskset -c 1 wrk -t1 -c32 -d"${DUR}s" -s "$OUT/gray.lua" "http://127.0.0.1:$4/" | grep '^GRAY')
  after=$(upstream_requests)
  read -r _ n p99 p999 errs <<< "$line"
  echo -e "$1\t$2\t$3\t$n\t$p99\t$p999\t$errs\t$(python3 -c "print(f'{($after - $before - 1) / $n:.4f}')")" >> "$RESULTS"
}
for scenario in healthy slow; do
  gray_backends "$scenario"
  sleep 1
  ROUND_SCENARIO=$scenario
  run_one() { measure "$1" "$ROUND_SCENARIO" "$2" "$3"; }
  bench_interleave run_one
done

# errors: time from the switch to halo's ejection of the first backend.
EJECT=$OUT/gray-eject.tsv
echo -e "round\tseconds_to_ejection" > "$EJECT"
for round in $(seq "$ROUNDS"); do
  gray_backends healthy
  # Past any earlier ejection (each one in a row lasts twice the last).
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$P_ADMIN/metrics" | grep -q "^halo_endpoint_up{upstream=\"b\",endpoint=\"127.0.0.1:$B1\"} 1" && break
    sleep 0.5
  done
  start_ej=$(ejections); start_ej=${start_ej:-0}
  taskset -c 1 wrk -t1 -c32 -d25s "http://127.0.0.1:$P_HALO/" > /dev/null &
  wrk_pid=$!
  sleep 2
  gray_backends errors
  t0=$(date +%s.%N); took="-"
  for _ in $(seq 200); do
    now_ej=$(ejections)
    if [ "${now_ej:-0}" != "$start_ej" ]; then took=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.2f}')"); break; fi
    sleep 0.1
  done
  wait "$wrk_pid" || true
  echo -e "$round\t$took" >> "$EJECT"
done

# uniform: 1% errors everywhere, under load, for UNIFORM_SECS.
gray_backends uniform
before_all=$(all_ejections)
taskset -c 1 wrk -t1 -c32 -d"${UNIFORM_SECS}s" "http://127.0.0.1:$P_HALO/" > "$OUT/gray-uniform.txt"
after_all=$(all_ejections)
uniform_requests=$(awk '/requests in/ {print $1}' "$OUT/gray-uniform.txt")

python3 - "$RESULTS" "$EJECT" "$UNIFORM_SECS" "$uniform_requests" "$((after_all - before_all))" <<'PY' | tee "$OUT/gray.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
med = lambda xs: statistics.median(xs) if xs else float("nan")
def v(scn, tgt, k):
    return [float(r[k]) for r in rows if r["scenario"] == scn and r["target"] == tgt]
print("| target | healthy p99.9 ms | slow p99.9 ms | slow / healthy | slow p99 ms | upstream requests per request (slow) | errors |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for t in ("halo", "haproxy", "nginx"):
    h, s = med(v("healthy", t, "p999_ms")), med(v("slow", t, "p999_ms"))
    print(f"| {t} | {h:.2f} | {s:.2f} | {s / h:.2f}x | {med(v('slow', t, 'p99_ms')):.2f} | "
          f"{med(v('slow', t, 'upstream_per_request')):.4f} | {sum(v('slow', t, 'errors')):.0f} |")
ej = [r["seconds_to_ejection"] for r in csv.DictReader(open(sys.argv[2]), delimiter="\t")]
print(f"\nerrors (10% 500 on one backend): halo ejected it after {', '.join(ej)} s (rounds)")
print(f"uniform (1% 500 everywhere, {sys.argv[3]} s, {sys.argv[4]} requests): halo ejections: {sys.argv[5]}")
PY
echo "raw rows: $RESULTS $EJECT" >&2
