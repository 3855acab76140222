#!/bin/sh
# halo's [backup] restore: the dump on stdin restored into the primary
# ($HALO_PRIMARY_HOST:$HALO_PRIMARY_PORT, wherever it runs) in one
# transaction; the replicas get it by streaming replication, as any write.
set -eu
. "$(dirname "$0")/lib.sh"
[ -n "${HALO_PRIMARY_HOST:-}" ] || { echo "no primary serves now" >&2; exit 1; }
"$BIN/pg_restore" -h "$HALO_PRIMARY_HOST" -p "$HALO_PRIMARY_PORT" -U postgres -d postgres \
  --clean --if-exists --single-transaction --no-owner
