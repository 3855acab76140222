#!/usr/bin/env bash
# The control plane at scale on one machine: for each N, N simulated nodes
# in one process (crates/halo/tests/scale.rs: each the real control plane,
# with a driver whose instances start at once, against one real etcd).
# Per N: start-up, memory per node, an idle window (probes per node, etcd
# messages and bytes, CPU per node and etcd's, store reads per node) empty
# and with SERVICES services of REPLICAS instances, placement of those
# (instances per second), one `halo scale` of one service (etcd messages
# over idle, store reads of the nodes not hosting it), a node killed (its
# endpoints out of every other node's proxy: p50, p99; its instances ready
# elsewhere) and the leader frozen (another leads; its instances replaced).
#
# Usage: bench/scale.sh [N...]          (default: 10 100 300 1000)
#   SERVICES (default 500) REPLICAS (default 3) set the work;
#   HALO_BENCH_APPEND=1 appends the table to docs/benchmarks.md.
# Needs etcd-server (scripts/install-test-deps.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
NS=${*:-10 100 300 1000}
SERVICES=${SERVICES:-500}
REPLICAS=${REPLICAS:-3}
command -v etcd >/dev/null || scripts/install-test-deps.sh >/dev/null
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# The test binary, built once: every N runs the same build.
BIN=$(cargo test --release -q -p halo --test scale --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "scale" and m.get("executable"):
        print(m["executable"])')
OUT=$(mktemp -d /tmp/halo-scale.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
for n in $NS; do
  echo "== $n nodes, $SERVICES services x $REPLICAS" >&2
  HALO_SCALE_NODES=$n HALO_SCALE_SERVICES=$SERVICES HALO_SCALE_REPLICAS=$REPLICAS RUST_BACKTRACE=0 \
    "$BIN" --ignored --exact bench_scale --nocapture 2>"$OUT/err-$n" \
    | sed -n 's/^SCALE //p' >"$OUT/$n.json" || { grep -A3 panicked "$OUT/err-$n" | head -20 >&2; exit 1; }
  cat "$OUT/$n.json" >&2
done
TABLE=$(python3 - "$OUT" $NS <<'PY'
import json, sys
out, ns = sys.argv[1], sys.argv[2:]
rows = [json.load(open(f"{out}/{n}.json")) for n in ns]
def line(label, f):
    return f"| {label} | " + " | ".join(f(r) for r in rows) + " |"
print("| nodes | " + " | ".join(str(r["nodes"]) for r in rows) + " |")
print("|---|" + "---|" * len(rows))
L = [
 ("start-up of every node (s)", lambda r: f'{r["start_s"]:.1f}'),
 ("memory per node, empty / with the services (MiB)", lambda r: f'{r["mem_per_node_mib_empty"]:.2f} / {r["mem_per_node_mib_full"]:.2f}'),
 ("probes per node per s", lambda r: f'{r["idle_empty"]["probes_per_node_s"]:.1f}'),
 ("idle, empty: etcd msgs/s, KiB/s", lambda r: f'{r["idle_empty"]["etcd_msgs_s"]:.0f}, {r["idle_empty"]["etcd_kib_s"]:.0f}'),
 ("idle, with services: etcd msgs/s, KiB/s", lambda r: f'{r["idle_full"]["etcd_msgs_s"]:.0f}, {r["idle_full"]["etcd_kib_s"]:.0f}'),
 ("idle CPU per node, empty / with services (% of a core)", lambda r: f'{r["idle_empty"]["cpu_per_node_pct"]:.3f} / {r["idle_full"]["cpu_per_node_pct"]:.3f}'),
 ("idle etcd CPU, empty / with services (%)", lambda r: f'{r["idle_empty"]["etcd_cpu_pct"]:.0f} / {r["idle_full"]["etcd_cpu_pct"]:.0f}'),
 ("idle store requests per node per s: reads, writes, lease renewals", lambda r: f'{r["idle_full"]["reads_per_node_s"]:.2f}, {r["idle_full"].get("writes_per_node_s", 0):.2f}, {r["idle_full"].get("leases_per_node_s", 0):.2f}'),
 ("placement: instances/s (all ready, s)", lambda r: f'{r["instances_per_s"]:.0f} ({r["place_s"]:.1f})'),
 ("one scale: ready (s)", lambda r: f'{r["scale"]["ready_s"]:.2f}'),
 ("one scale: etcd msgs, KiB over idle", lambda r: f'{r["scale"]["etcd_msgs_over_idle"]:.0f}, {r["scale"]["etcd_kib_over_idle"]:.0f}'),
 ("one scale: store reads per node not hosting it (mean, max)", lambda r: f'{r["scale"]["reads_per_other_node"]:.2f}, {r["scale"]["reads_per_other_node_max"]:.0f}'),
 ("kill: out of every proxy p50 / p99 (s)", lambda r: f'{r["kill"]["out_of_proxies_p50_s"]:.2f} / {r["kill"]["out_of_proxies_p99_s"]:.2f}'),
 ("kill: instances ready elsewhere (s)", lambda r: f'{r["kill"]["replaced_s"]:.2f}'),
 ("leader frozen: another leads / its instances replaced (s)", lambda r: f'{r["freeze_leader"]["new_leader_s"]:.2f} / {r["freeze_leader"]["replaced_s"]:.2f}'),
]
for label, f in L:
    print(line(label, f))
PY
)
echo "$TABLE"
if [ "${HALO_BENCH_APPEND:-}" = 1 ]; then
  {
    echo
    echo "### \`bench/scale.sh $NS\` ($SERVICES services x $REPLICAS, $(date -u +%F), $(nproc) cores)"
    echo
    echo "$TABLE"
  } >>docs/benchmarks.md
fi
