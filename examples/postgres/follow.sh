#!/bin/sh
# halo's `follow`: stream from the primary at $HALO_PRIMARY_HOST:$HALO_PRIMARY_PORT
# (PostgreSQL 13 and later take a new primary_conninfo on reload).
set -eu
. "$(dirname "$0")/lib.sh"
standby=$(sql 'select pg_is_in_recovery()')
[ "$standby" = t ] || { echo "not a standby: a primary is rewound first" >&2; exit 1; }
sql "alter system set primary_conninfo = 'host=$HALO_PRIMARY_HOST port=$HALO_PRIMARY_PORT user=replicator application_name=$HALO_INSTANCE'" >/dev/null
sql "select pg_reload_conf()" >/dev/null
