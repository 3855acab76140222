#!/usr/bin/env bash
# PostgreSQL failover and switchover, halo against Patroni 3 (Debian's
# package) with HAProxy routing by Patroni's REST API (/primary) as its
# documentation sets it up, on the same three-node harness (network
# namespaces, a 3-member etcd): for each fault of the primary's node
# (kill -9, SIGSTOP, a link cut) and a planned switchover, in asynchronous
# and synchronous replication, RUNS fresh clusters per system, the runs of
# the systems interleaved (one of each in turn). Per run: the time from the
# fault to the first write a new primary acknowledged, the longest gap
# between two acknowledged writes, writes the old primary acknowledged
# after the new one's first (must be 0), and acknowledged writes missing
# afterwards (lost).
#
# Usage: bench/stateful.sh [RUNS] [FAULTS] [SYSTEMS] [MODES]
#   defaults: 10 "kill stop cut switchover" "halo patroni-tight patroni-defaults" "async sync"
# Patroni: "defaults" is ttl 30, loop_wait 10, retry_timeout 10; "tight" the
# least its documentation allows (ttl 20, loop_wait 1, retry_timeout 3).
# Needs root (namespaces), etcd-server, PostgreSQL, patroni and haproxy
# (scripts/install-test-deps.sh installs the first two; this the others).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-10}
FAULTS=${2:-kill stop cut switchover}
SYSTEMS=${3:-halo patroni-tight patroni-defaults}
MODES=${4:-async sync}
scripts/install-test-deps.sh >/dev/null
if ! command -v patroni >/dev/null || ! command -v haproxy >/dev/null; then
  apt-get install -y -qq patroni haproxy >/dev/null
fi
cargo build --release -p halo --bin halo --test stateful >/dev/null 2>&1
out=target/bench-stateful.txt
# HALO_BENCH_APPEND=1 adds to the last invocation's runs (the table is of all).
[ "${HALO_BENCH_APPEND:-0}" = 1 ] || : >"$out"
for fault in $FAULTS; do
  for mode in $MODES; do
    sync=0; [ "$mode" = sync ] && sync=1
    for run in $(seq 1 "$RUNS"); do
      for system in $SYSTEMS; do
        case "$system" in
          halo) test=bench_failover; extra=() ;;
          patroni-tight) test=bench_patroni; extra=(HALO_BENCH_PATRONI=tight) ;;
          patroni-defaults) test=bench_patroni; extra=(HALO_BENCH_PATRONI=defaults) ;;
          *) echo "unknown system '$system'; accepted: halo patroni-tight patroni-defaults" >&2; exit 2 ;;
        esac
        env HALO_BENCH_RUNS=1 HALO_BENCH_FAULT="$fault" HALO_BENCH_SYNC=$sync "${extra[@]}" \
          cargo test --release -q -p halo --test stateful "$test" -- --ignored --nocapture --exact 2>/dev/null |
          grep '^RESULT' | tee -a "$out" >&2 || echo "run $run of $system ($fault, $mode) failed" >&2
      done
    done
  done
done
python3 - "$out" <<'PY'
import sys, statistics, collections
rows = [dict(kv.split("=", 1) for kv in l.split()[1:]) for l in open(sys.argv[1]) if l.startswith("RESULT")]
groups = collections.OrderedDict()
for r in rows:
    mode = "sync" if r["sync"] == "true" else "async"
    groups.setdefault((r["fault"], mode, r["system"]), []).append(r)
print("| fault | replication | system | runs | first write after the fault: median | max | longest gap between acknowledged writes: median | acknowledged writes lost | writes taken by the old primary after the new one's first |")
print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for (fault, mode, system), rs in groups.items():
    t = sorted(int(r["first_write_ms"]) for r in rs)
    g = sorted(int(r["gap_ms"]) for r in rs)
    lost = sum(int(r["lost"]) for r in rs)
    acked = sum(int(r["acked"]) for r in rs)
    late = sum(int(r["old_primary_writes_after"]) for r in rs)
    print(f"| {fault} | {mode} | {system} | {len(rs)} | {statistics.median(t)/1000:.2f} s | {t[-1]/1000:.2f} s | {statistics.median(g)/1000:.2f} s | {lost} of {acked} | {late} |")
PY
