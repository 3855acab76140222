#!/usr/bin/env bash
# Failover of a PostgreSQL primary (examples/postgres.toml) on the
# three-node harness (network namespaces, a 3-member etcd, halo agents),
# under a write load of one psql connection per insert through the
# surviving nodes' listeners: for each fault of the primary's node (kill -9,
# SIGSTOP, a link cut), RUNS fresh clusters, the time from the fault to the
# first acknowledged write, median and p99 (the largest of 10), and the
# writes the old primary acknowledged after the new one's first (must be 0).
#
# Usage: bench/stateful.sh [RUNS] [FAULTS...]   (defaults 10, kill stop cut)
# Needs root (namespaces), etcd-server and PostgreSQL (scripts/install-test-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-10}
shift || true
FAULTS=${*:-kill stop cut}
scripts/install-test-deps.sh >/dev/null
cargo build --release -p halo --bin halo --test stateful >/dev/null 2>&1
for fault in $FAULTS; do
  HALO_BENCH_RUNS=$RUNS HALO_BENCH_FAULT=$fault cargo test --release -q -p halo --test stateful bench_failover \
    -- --ignored --nocapture --exact 2>/dev/null | grep '^RESULT' | tee "target/bench-stateful-$fault.txt" >&2
  python3 - "$fault" "target/bench-stateful-$fault.txt" <<'PY'
import sys, statistics
fault, path = sys.argv[1], sys.argv[2]
rows = [dict(kv.split("=") for kv in l.split()[1:]) for l in open(path)]
t = sorted(int(r["first_write_ms"]) for r in rows)
late = sum(int(r["old_primary_writes_after"]) for r in rows)
p99 = t[min(len(t) - 1, int(round(0.99 * (len(t) - 1))))]
print(f"{fault:5} runs={len(t)} first write after the fault: median {statistics.median(t):.0f} ms, p99 {p99} ms, min {t[0]} ms, max {t[-1]} ms; writes taken by the old primary after the new one's first: {late}")
PY
done
