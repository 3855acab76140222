#!/bin/sh
# Runs one PostgreSQL instance (halo's `run.command`). halo writes
# $HALO_STATE_DIR/halo-role before each start: `primary` starts a primary
# (a new service's first instance makes the database), anything else a
# read-only standby (halo's `clone` made its data).
set -eu
. "$(dirname "$0")/lib.sh"
role=$(cat "$HALO_STATE_DIR/halo-role" 2>/dev/null || echo replica)
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  [ "$role" = primary ] || { echo "no data in $PGDATA: halo clones a replica before it starts" >&2; exit 1; }
  # initdb refuses a directory with anything in it: data that lost its
  # PG_VERSION is never overwritten.
  "$BIN/initdb" -D "$PGDATA" -U postgres --auth=trust >/dev/null
  cat >>"$PGDATA/postgresql.conf" <<CONF
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
wal_log_hints = on          # pg_rewind needs it
wal_keep_size = 512MB
unix_socket_directories = ''
CONF
  # Trust on loopback for the one-machine demo; use scram-sha-256 and a
  # password file (PGPASSFILE) across machines.
  printf 'host all all 0.0.0.0/0 trust\nhost replication all 0.0.0.0/0 trust\n' >>"$PGDATA/pg_hba.conf"
  # The replication user, and the row check.sh writes on the primary.
  printf '%s\n' "CREATE ROLE replicator WITH REPLICATION LOGIN;" \
    "CREATE TABLE halo_heartbeat (id int PRIMARY KEY, at timestamptz NOT NULL);" \
    "CREATE TABLE halo_term (token bigint PRIMARY KEY, at timestamptz NOT NULL);" |
    "$BIN/postgres" --single -D "$PGDATA" postgres >/dev/null
fi
if [ "$role" = primary ]; then rm -f "$PGDATA/standby.signal"; else touch "$PGDATA/standby.signal"; fi
exec "$BIN/postgres" -D "$PGDATA" -p "$PORT" -c listen_addresses="$HOST"
