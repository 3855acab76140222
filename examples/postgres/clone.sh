#!/bin/sh
# halo's `clone`: a new replica's data, copied from the primary.
set -eu
. "$(dirname "$0")/lib.sh"
rm -rf "$PGDATA"
"$BIN/pg_basebackup" -h "$HALO_PRIMARY_HOST" -p "$HALO_PRIMARY_PORT" -U replicator -D "$PGDATA" \
  -X stream -c fast -R
