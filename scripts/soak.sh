#!/usr/bin/env bash
# The chaos soak: the three-node cluster in network namespaces under
# steady load while random faults hit it (kill -9 of an instance, an agent,
# the leader, a node; SIGSTOP; link down; an etcd member down; 100 reloads;
# apply, a canary rollout, scale, restart, backup), then checks on the record: no failed
# request, one leader writing at a time, no instance running twice, full
# capacity back after each fault, every acknowledged write stored.
#
#   scripts/soak.sh [MINUTES]     # default 3 (the test command's run)
#
# HALO_SOAK_SEED=N replays a run's choices (every run prints its seed).
# Needs root, iproute2, iptables and etcd (scripts/install-test-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=${1:-3}
case "$minutes" in
  '' | *[!0-9.]* | .* | *.*.*) echo "MINUTES must be a number of minutes such as 3 or 0.5, not '$minutes'" >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "the soak needs root (network namespaces)" >&2; exit 1; }

export HALO_SOAK_MINUTES=$minutes
# The workspace's own build (the test command's, nothing compiled again);
# .config/nextest.toml lets the soak run for hours (it bounds itself).
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace -E 'binary(soak)' --run-ignored ignored-only --no-capture
else
  cargo test --workspace --test soak -- --ignored --nocapture
fi
