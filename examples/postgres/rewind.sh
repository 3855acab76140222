#!/bin/sh
# halo's `rewind`: a former primary (stopped) made to follow the new one;
# when it fails halo clones the instance anew.
set -eu
. "$(dirname "$0")/lib.sh"
source="host=$HALO_PRIMARY_HOST port=$HALO_PRIMARY_PORT user=postgres dbname=postgres"
# pg_rewind needs a cleanly shut down server: one that crashed (kill -9,
# its node lost) finishes its crash recovery first, in single-user mode.
state=$("$BIN/pg_controldata" -D "$PGDATA" | sed -n 's/^Database cluster state: *//p')
case "$state" in
  "shut down" | "shut down in recovery") ;;
  *)
    rm -f "$PGDATA/standby.signal" "$PGDATA/recovery.signal"
    "$BIN/postgres" --single -D "$PGDATA" -c archive_mode=off postgres </dev/null >/dev/null
    ;;
esac
# A primary just promoted records its new timeline in its control file
# only at its next checkpoint; pg_rewind reads the timeline there (and
# would make a server that cannot start): a checkpoint first.
"$BIN/psql" -d "$source" -XAtqv ON_ERROR_STOP=1 -c checkpoint >/dev/null
"$BIN/pg_rewind" -D "$PGDATA" -R --source-server="$source"
