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
# cargo test, not nextest: the soak runs as long as asked (it bounds
# itself), past nextest's timeouts for one test.
cargo test -p halo --test soak -- --ignored --nocapture
