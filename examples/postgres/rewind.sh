#!/bin/sh
# halo's `rewind`: a former primary (stopped) made to follow the new one;
# when it fails halo clones the instance anew.
set -eu
. "$(dirname "$0")/lib.sh"
"$BIN/pg_rewind" -D "$PGDATA" -R \
  --source-server="host=$HALO_PRIMARY_HOST port=$HALO_PRIMARY_PORT user=postgres dbname=postgres"
