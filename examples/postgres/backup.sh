#!/bin/sh
# halo's [backup] command: a dump of the database (pg_dump's custom format)
# on stdout, taken from this instance; halo runs it beside a healthy
# replica when there is one, so the primary does not pay for it. halo's own
# tables (its heartbeat, its terms) are left out.
set -eu
. "$(dirname "$0")/lib.sh"
exec "$BIN/pg_dump" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -Fc \
  --exclude-table=halo_heartbeat --exclude-table=halo_term
