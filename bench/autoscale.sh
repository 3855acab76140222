#!/usr/bin/env bash
# Autoscaling: capacity that follows load. halo (`halo up`, [autoscale]) vs
# HAProxy and nginx in front of the same application with a fixed pool.
#
# The application is `halo demo-app --delay-ms 20 --workers 2`: 100 requests
# a second per instance at most, a queue past that. The load is open loop
# (bench/steps.py: requests start when due, latency counted from then).
# Three scenarios:
#   step:  ROUNDS rounds, interleaved: 20 s at 1x (60 requests/s per initial
#          instance, 2 instances), then 40 s at 5x. Per proxy, the p99 of
#          the 1x phase, and how long after the step until the per-second
#          p99 is back within 2x of it and stays there (5 s in a row).
#          halo scales on in_flight = 1.5 (of the 2 workers) from 2, up to
#          12; HAProxy and nginx keep the 2 instances (neither scales).
#   cold:  COLD rounds: the application's own start (spawn to first answer
#          of /healthz, measured alone), then halo's first answer for a
#          service at zero (min = 0): the difference is halo's cold start.
#   swing: halo alone, OSC_SECS (default 600, the target's 10 minutes): a
#          load swinging +-20% around what 4 instances serve at their
#          target (square wave, 30 s period); the scale changes counted
#          (the first one sizes for the peaks; the target is none after).
#
# Usage: bench/autoscale.sh [ROUNDS] [COLD]   (defaults 3, 5)
# Env: OSC_SECS=600 OUT=bench/out BASE=19600 HALO_BIN=path
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
COLD=${2:-5}
OSC_SECS=${OSC_SECS:-600}
BASE=${BASE:-19600}

source bench/common.sh
bench_need haproxy:haproxy nginx:nginx-light python3:python3 curl:curl
bench_build
P_HALO=$((BASE + 10)); P_HAPROXY=$((BASE + 11)); P_NGINX=$((BASE + 12)); P_API=$((BASE + 13))
A1=$((BASE + 21)); A2=$((BASE + 22)); A3=$((BASE + 23)); A4=$((BASE + 24))
DATA=$OUT/autoscale-data
H() { "$HALO" "$@" --data-dir "$DATA"; }

# halo up with one listener and no service of its own.
rm -rf "$DATA"
cat > "$OUT/autoscale-node.toml" <<CONF
[node]
api = "127.0.0.1:$P_API"
[proxy]
workers = 1
[[listeners]]
name = "http"
listen = "127.0.0.1:$P_HALO"
CONF
"$HALO" up -c "$OUT/autoscale-node.toml" --data-dir "$DATA" > "$OUT/autoscale-up.log" 2>&1 &
HALO_PID=$!
# halo's instances outlive a killed halo (by design): SIGTERM stops them,
# given the time to.
autoscale_cleanup() {
  kill "$HALO_PID" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$HALO_PID" 2>/dev/null || break; sleep 0.1; done
  bench_cleanup
}
trap autoscale_cleanup EXIT
for _ in $(seq 100); do H status >/dev/null 2>&1 && break; sleep 0.1; done

# The fixed pools HAProxy (A1, A2) and nginx (A3, A4) send to: the same
# application, 2 instances each, started afresh for each round (an
# overloaded one keeps serving the queue its clients gave up on).
declare -A POOL_PIDS
pool() { # NAME PORT PORT
  local name=$1 port
  shift
  for p in ${POOL_PIDS[$name]:-}; do
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  POOL_PIDS[$name]=""
  for port in "$@"; do
    "$HALO" demo-app --port "$port" --delay-ms 20 --workers 2 > /dev/null 2>&1 &
    POOL_PIDS[$name]+=" $!"
    PIDS+=($!)
  done
  for port in "$@"; do
    for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/healthz" && break; sleep 0.05; done
    curl -sf -o /dev/null "http://127.0.0.1:$port/healthz" || { echo "the pool's $port does not answer" >&2; exit 1; }
  done
}
pool haproxy $A1 $A2
pool nginx $A3 $A4
{
  bench_haproxy_head http
  printf 'frontend fe\n  bind 127.0.0.1:%s\n  default_backend be\n' "$P_HAPROXY"
  printf 'backend be\n  balance roundrobin\n  server a1 127.0.0.1:%s\n  server a2 127.0.0.1:%s\n' "$A1" "$A2"
} > "$OUT/autoscale-haproxy.cfg"
haproxy -f "$OUT/autoscale-haproxy.cfg" > "$OUT/autoscale-haproxy.log" 2>&1 &
HAPROXY_PID=$!
PIDS+=($HAPROXY_PID)
{
  bench_nginx_head autoscale-nginx
  printf 'http {\n  access_log off;\n  upstream b {\n    server 127.0.0.1:%s;\n    server 127.0.0.1:%s;\n    keepalive 256;\n  }\n' "$A3" "$A4"
  printf '  server {\n    listen 127.0.0.1:%s;\n    location / {\n      proxy_pass http://b;\n' "$P_NGINX"
  printf '      proxy_http_version 1.1;\n      proxy_set_header Connection "";\n    }\n  }\n}\n'
} > "$OUT/autoscale-nginx.conf"
nginx -c "$OUT/autoscale-nginx.conf" -p "$OUT" &
NGINX_PID=$!
PIDS+=($NGINX_PID)
for port in $P_HAPROXY $P_NGINX; do
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
  curl -sf -o /dev/null "http://127.0.0.1:$port/" || { echo "nothing answers on $port" >&2; exit 1; }
done

# service NAME REPLICAS AUTOSCALE_LINES: applies demo-app as NAME, routed by
# Host NAME.localhost.
service() {
  cat > "$OUT/autoscale-$1.toml" <<TOML
name = "$1"
replicas = $2
[run]
command = "$HALO"
args = ["demo-app", "--delay-ms", "20", "--workers", "2"]
[readiness]
http = "/healthz"
interval = "50ms"
[[routes]]
host = "$1.localhost"
path_prefix = "/"
[autoscale]
$3
TOML
  H apply -f "$OUT/autoscale-$1.toml" > /dev/null
}
ready() { # NAME N: waits until NAME has N ready instances asked for
  for _ in $(seq 600); do
    H status -o json | python3 -c "
import json, sys
s = [x for x in json.load(sys.stdin)['cluster']['services'] if x['name'] == '$1']
sys.exit(0 if s and s[0]['replicas'] == $2 and s[0]['ready'] == $2 else 1)" && return 0
    sleep 0.1
  done
  echo "$1 never had $2 ready instances" >&2
  return 1
}
scales() { # NAME: how many "scaled" events NAME has had
  H events --service "$1" -n 10000 -o json | python3 -c "
import json, sys
print(sum(1 for e in json.load(sys.stdin) if e['kind'] == 'scaled'))"
}

# --- step ---------------------------------------------------------------
# recovery FILE: the 1x p99, and seconds after the step until the per-second
# p99 is within 2x of it for 5 seconds in a row ('-' if never).
recovery() {
  python3 - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"second"' in l]
pre = sorted(r["p99_ms"] for r in rows[5:20] if r["p99_ms"] is not None)
if not pre:
    print(f"- - - {sum(r['failed'] for r in rows)}")
    sys.exit()
base = pre[len(pre) // 2]
after = rows[20:]
back = None
for i in range(len(after) - 5):
    if all(r["p99_ms"] is not None and r["p99_ms"] <= 2 * base and r["failed"] == 0 for r in after[i:i + 5]):
        back = i
        break
failed = sum(r["failed"] for r in rows)
worst = max((r["p99_ms"] or 0) for r in after)
print(f"{base} {back if back is not None else '-'} {worst} {failed}")
PY
}
step_round() { # ROUND NAME PORT PID
  local round=$1 name=$2 port=$3 host=step.localhost
  case $name in
    haproxy) pool haproxy $A1 $A2 ;;
    nginx) pool nginx $A3 $A4 ;;
  esac
  if [ "$name" = halo ]; then
    # From 2 instances each round.
    H delete step > /dev/null 2>&1 || true
    for _ in $(seq 100); do H get step > /dev/null 2>&1 || break; sleep 0.1; done
    sleep 1 # (the leader forgets its count: a new service starts from its file)
    service step 2 'min = 2
max = 12
in_flight = 1.5
scale_down_window = "5m"'
    ready step 2
  fi
  python3 bench/steps.py "$port" "$host" "20:120,40:600" 5 > "$OUT/autoscale-step-$name-$round.jsonl"
  read -r base back worst failed < <(recovery "$OUT/autoscale-step-$name-$round.jsonl")
  local extra=""
  [ "$name" = halo ] && extra=" scaled_to=$(H status -o json | python3 -c "
import json, sys
print([x for x in json.load(sys.stdin)['cluster']['services'] if x['name'] == 'step'][0]['replicas'])")"
  echo "step $name round $round: p99 at 1x ${base} ms, back within 2x after ${back} s, worst p99 ${worst} ms, failed ${failed}${extra}" | tee -a "$OUT/autoscale.txt"
}
: > "$OUT/autoscale.txt"
bench_interleave step_round

# --- cold ---------------------------------------------------------------
service cold 0 'min = 0
max = 2
in_flight = 4
scale_to_zero_after = "1s"
cold_start_timeout = "30s"'
sleep 1.5
for round in $(seq "$COLD"); do
  # The application alone: spawn to the first answer of /healthz.
  port=$((BASE + 30))
  app_ms=$(python3 - "$HALO" "$port" <<'PY'
import socket, subprocess, sys, time
t = time.monotonic()
p = subprocess.Popen([sys.argv[1], "demo-app", "--port", sys.argv[2]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while True:
    try:
        s = socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=1)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        if s.recv(100).startswith(b"HTTP/1.1 200"):
            break
    except OSError:
        pass
    time.sleep(0.0005)
print(round((time.monotonic() - t) * 1000, 1))
p.kill()
p.wait()
PY
)
  # Wait for zero (scale_to_zero_after = 1 s), then the first request.
  for _ in $(seq 300); do
    H status -o json | python3 -c "
import json, sys
s = [x for x in json.load(sys.stdin)['cluster']['services'] if x['name'] == 'cold'][0]
sys.exit(0 if s['replicas'] == 0 and s['placed'] == 0 else 1)" && break
    sleep 0.1
  done
  halo_ms=$(curl -s -o /dev/null -w '%{time_total}' -H 'Host: cold.localhost' "http://127.0.0.1:$P_HALO/" |
    awk '{printf "%.1f", $1 * 1000}')
  echo "cold round $round: application start ${app_ms} ms, first answer through halo ${halo_ms} ms, halo's part $(awk -v a="$app_ms" -v h="$halo_ms" 'BEGIN {printf "%.1f", h - a}') ms" | tee -a "$OUT/autoscale.txt"
  sleep 2
done
H delete cold > /dev/null

# --- swing --------------------------------------------------------------
# 4 instances at in_flight 1.5 each, 20 ms a request: 300 requests/s; +-20%.
service swing 4 'min = 1
max = 12
in_flight = 1.5'
ready swing 4
python3 bench/steps.py "$P_HALO" swing.localhost "$OSC_SECS:240~360/30" 5 > "$OUT/autoscale-swing.jsonl"
n=$(scales swing)
echo "swing: ${OSC_SECS} s of 240-360 requests/s (300 +-20%, 30 s period): $n scale changes; $(H events --service swing -n 100 | grep -c scaled || true) listed: $(H events --service swing -n 100 | grep scaled | sed 's/.*scaled  *swing  *//' | paste -sd ';' -)" | tee -a "$OUT/autoscale.txt"
tail -1 "$OUT/autoscale-swing.jsonl" | tee -a "$OUT/autoscale.txt"
