#!/usr/bin/env bash
# The control plane at scale on one machine (a benchmark, not a test):
#   bench/control_scale.sh [AGENTS] [SERVICES] [REPLICAS]   (default 10 100 5)
# One real etcd and AGENTS `halo agent`s on loopback addresses 127.0.1.N;
# SERVICES services of REPLICAS `halo demo-app` instances each. Reports:
# apply-to-ready of every service, store requests per node for one
# service change against an idle window of the same length, the agents'
# idle CPU, and the time for a lost node's instances to be replaced.
# Everything it starts is stopped on exit. Needs root only to install
# etcd-server, curl and jq when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTS=${1:-10}
SERVICES=${2:-100}
REPLICAS=${3:-5}
WINDOW=10
OUT=$(mktemp -d /tmp/halo-scale.XXXXXX)
BASE=$((20000 + RANDOM % 20000))
PIDS=()

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v curl >/dev/null || need+=(curl)
command -v jq >/dev/null || need+=(jq)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# HALO_BIN: another build to compare (one without halo_store_requests_total
# shows only etcd's own counters).
if [ -n "${HALO_BIN:-}" ]; then
  HALO=$HALO_BIN
else
  cargo build --release -q -p halo
  HALO=$PWD/target/release/halo
fi

# kill_instances_of DIR_REGEX: kill -9 of every process whose environment
# has HALO_DATA_DIR matching it (instances outlive a killed agent).
kill_instances_of() {
  local e p
  for e in /proc/[0-9]*/environ; do
    if grep -qsaz "^HALO_DATA_DIR=$1\$" "$e"; then
      p=${e#/proc/}
      kill -9 "${p%/environ}" 2>/dev/null || true
    fi
  done
}

cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 1 100); do
    alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.2
  done
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  # Instances of a killed agent outlive it by design: end them too.
  kill_instances_of "$OUT/[^/]*"
  rm -rf "$OUT"
}
trap cleanup EXIT

addr() { echo "127.0.1.$1"; }
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.2f", a - b }'; }

etcd --name bench --data-dir "$OUT/etcd" \
  --listen-client-urls "http://127.0.0.1:$BASE" --advertise-client-urls "http://127.0.0.1:$BASE" \
  --listen-peer-urls "http://127.0.0.1:$((BASE + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((BASE + 1))" \
  --initial-cluster "bench=http://127.0.0.1:$((BASE + 1))" >"$OUT/etcd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$BASE/health" >/dev/null && break; sleep 0.1; done

declare -A AGENT_PID
for i in $(seq 1 "$AGENTS"); do
  cat >"$OUT/n$i.toml" <<TOML
[node]
api = "$(addr "$i"):7070"
[[listeners]]
name = "http"
listen = "$(addr "$i"):8080"
TOML
  HALO_LOG=warn "$HALO" agent --store "etcd://127.0.0.1:$BASE" --node "n$i" --advertise "$(addr "$i")" \
    -c "$OUT/n$i.toml" --data-dir "$OUT/n$i" >"$OUT/n$i.log" 2>&1 &
  PIDS+=($!)
  AGENT_PID[$i]=$!
done
for i in $(seq 1 "$AGENTS"); do
  for _ in $(seq 1 200); do grep -q '^ready' "$OUT/n$i.log" && break; sleep 0.1; done
  grep -q '^ready' "$OUT/n$i.log" || { echo "agent n$i did not start:" >&2; cat "$OUT/n$i.log" >&2; exit 1; }
done
TOKEN=$(cat "$OUT/n1/token")
api() { curl -sf -H "Authorization: Bearer $TOKEN" "$@"; }
ready_count() { api "http://$(addr 1):7070/v1/nodes" | jq '[.placements[] | select(.ready)] | length'; }
wait_ready() { # N TIMEOUT_S
  local deadline=$(($(date +%s) + $2))
  while [ "$(ready_count)" != "$1" ]; do
    [ "$(date +%s)" -lt $deadline ] || { echo "timed out waiting for $1 ready (have $(ready_count))" >&2; exit 1; }
    sleep 0.2
  done
}
for _ in $(seq 1 100); do
  [ "$(api "http://$(addr 1):7070/v1/nodes" | jq '[.nodes[] | select(.alive)] | length')" = "$AGENTS" ] && break
  sleep 0.1
done

for s in $(seq -w 1 "$SERVICES"); do
  cat >"$OUT/svc-$s.toml" <<TOML
name = "svc-$s"
replicas = $REPLICAS
[run]
command = "halo"
args = ["demo-app"]
[readiness]
http = "/healthz"
interval = "1s"
[[routes]]
host = "svc-$s.local"
path_prefix = "/"
TOML
done
TOTAL=$((SERVICES * REPLICAS))
echo "# $AGENTS agents, one etcd, $SERVICES services x $REPLICAS replicas ($TOTAL instances), $(nproc) cores"
t0=$(now)
for s in $(seq -w 1 "$SERVICES"); do
  api -X PUT --data-binary "@$OUT/svc-$s.toml" "http://$(addr 1):7070/v1/services" >/dev/null
done
applied=$(since "$t0")
wait_ready "$TOTAL" 300
echo "apply of $SERVICES services: ${applied}s; all $TOTAL ready after $(since "$t0")s"
sleep 3

# Store requests by node and operation: {"n1": {"get": N, ...}, ...}
scrape() {
  curl -sf "http://127.0.0.1:$BASE/metrics" | awk '
    /^etcd_debugging_mvcc_range_total / { print "etcd range", $2 }
    /^etcd_debugging_mvcc_txn_total / { print "etcd txn", $2 }'
  for i in $(seq 1 "$AGENTS"); do
    api "http://$(addr "$i"):7070/metrics" | awk -v n="n$i" -F'[{}"= ]+' \
      '/^halo_store_requests_total/ { printf "%s %s %s\n", n, $3, $NF }'
  done
}
delta() { # BEFORE AFTER -> "node op delta" lines
  join -j1 <(awk '{print $1"/"$2, $3}' "$1" | sort) <(awk '{print $1"/"$2, $3}' "$2" | sort) |
    awk '{split($1, k, "/"); print k[1], k[2], $3 - $2}'
}
summary() { # DELTA_FILE LABEL
  awk -v label="$2" '
    $1 == "etcd" { etcd[$2] = $3; next }
    { by[$1] += $3; if ($2 == "get" || $2 == "list") reads[$1] += $3; total += $3; if ($2 == "get" || $2 == "list") rtotal += $3 }
    END { max = 0; for (n in by) if (by[n] > max) max = by[n];
          printf "%s: etcd served %d ranges and %d txns; the agents counted %d requests (%d reads), per node at most %d\n",
            label, etcd["range"], etcd["txn"], total, rtotal, max }' "$1"
}
scrape >"$OUT/idle0"
cpu0=$(for i in $(seq 1 "$AGENTS"); do awk '{print $14 + $15}' "/proc/${AGENT_PID[$i]}/stat"; done)
sleep "$WINDOW"
scrape >"$OUT/idle1"
cpu1=$(for i in $(seq 1 "$AGENTS"); do awk '{print $14 + $15}' "/proc/${AGENT_PID[$i]}/stat"; done)
delta "$OUT/idle0" "$OUT/idle1" >"$OUT/idle"
summary "$OUT/idle" "idle, ${WINDOW}s"
paste <(echo "$cpu0") <(echo "$cpu1") | awk -v w="$WINDOW" -v hz="$(getconf CLK_TCK)" '
  { p = ($2 - $1) / hz / w * 100; sum += p; if (p > max) max = p }
  END { printf "agents idle CPU: mean %.2f%%, max %.2f%% of one core\n", sum / NR, max }'

scrape >"$OUT/chg0"
tc=$(now)
api -X POST -d '{"replicas": '$((REPLICAS + 1))'}' "http://$(addr 1):7070/v1/services/svc-$(printf "%0${#SERVICES}d" 1)/scale" >/dev/null
wait_ready $((TOTAL + 1)) 60
echo "scale of one service ${REPLICAS} -> $((REPLICAS + 1)): ready after $(since "$tc")s"
sleep "$(awk -v w="$WINDOW" -v a="$(now)" -v b="$tc" 'BEGIN { r = w - (a - b); print (r > 0 ? r : 0) }')"
scrape >"$OUT/chg1"
delta "$OUT/chg0" "$OUT/chg1" >"$OUT/chg"
summary "$OUT/chg" "one-service change, ${WINDOW}s window"
echo "per node and operation, change window minus idle window (reads are get + list):"
join -j1 <(awk '$1 != "etcd" {print $1"/"$2, $3}' "$OUT/chg" | sort) <(awk '$1 != "etcd" {print $1"/"$2, $3}' "$OUT/idle" | sort) |
  awk '{split($1, k, "/"); d[k[1]] = d[k[1]] sprintf(" %s=%+d", k[2], $2 - $3)} END { for (n in d) print "  " n ":" d[n] }' | sort -V

# Node loss: kill -9 of an agent that does not lead, and of its instances.
leader=$(api "http://$(addr 1):7070/v1/nodes" | jq -r .leader)
victim=1
[ "$leader" = "n1" ] && victim=2
on_victim=$(api "http://$(addr 1):7070/v1/nodes" | jq "[.placements[] | select(.node == \"n$victim\")] | length")
observer=$((victim % AGENTS + 1))
[ "n$observer" = "n$victim" ] && observer=3
tl=$(now)
kill -9 "${AGENT_PID[$victim]}"
kill_instances_of "$OUT/n$victim"
ready_on() { api "http://$(addr "$observer"):7070/v1/nodes" | jq "[.placements[] | select(.ready and .node != \"n$victim\")] | length"; }
deadline=$(($(date +%s) + 120))
until [ "$(ready_on)" = "$((TOTAL + 1))" ]; do
  [ "$(date +%s)" -lt $deadline ] || { echo "the lost node's instances were not replaced" >&2; exit 1; }
  sleep 0.2
done
echo "kill -9 of n$victim ($on_victim instances, lease TTL 3s): all $((TOTAL + 1)) ready on the others after $(since "$tl")s"
