#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what the tests need,
# then formatting, lints and every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Every shipped example must validate.
for f in examples/*.toml; do
  cargo run --quiet -p halo -- check -c "$f"
done
# Where a Docker daemon answers, the docker tests must run (not skip), the
# daemon-restart one included: this machine's daemon is ours to restart.
if docker info >/dev/null 2>&1; then
  export HALO_REQUIRE_DOCKER=1 HALO_TEST_RESTART_DOCKERD=1
fi
# Chromium, dpkg-deb and systemd-analyze were installed above: the
# dashboard and package tests must run, not skip.
export HALO_REQUIRE_CHROMIUM=1 HALO_REQUIRE_PACKAGING=1
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
# The try-it-out cluster script: three nodes in network namespaces, a
# deploy, every node's proxy serving it, then everything removed.
cargo build --quiet -p halo
HALO_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/halo" HALO_CLUSTER_DIR="$(mktemp -d)" scripts/cluster.sh smoke
# The chaos soak in its short form: random faults under load on the
# three-node cluster, checked on the record (scripts/soak.sh MINUTES for a
# longer run).
scripts/soak.sh 3
