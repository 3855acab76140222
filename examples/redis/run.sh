#!/bin/sh
# Runs one Redis instance (halo's `run.command`). halo writes
# $HALO_STATE_DIR/halo-role before each start: `primary` starts a primary;
# anything else a read-only replica of nothing yet (halo's `follow` names
# the primary once one serves).
set -eu
# --set-proc-title no: Redis would write its title over its environment,
# where halo (and the test harness) find an instance's processes by its mark.
role=$(cat "$HALO_STATE_DIR/halo-role" 2>/dev/null || echo replica)
mkdir -p "$HALO_STATE_DIR/redis"
set -- --port "$PORT" --bind "$HOST" --dir "$HALO_STATE_DIR/redis" --protected-mode no \
  --appendonly yes --appendfsync everysec --save '' --daemonize no --logfile '' \
  --repl-diskless-sync yes --repl-diskless-sync-delay 0 \
  --set-proc-title no
if [ "$role" != primary ]; then
  # 127.0.0.1:1 answers nobody: read-only, and no data, until halo's follow.
  set -- "$@" --replicaof 127.0.0.1 1 --replica-read-only yes
fi
exec redis-server "$@"
