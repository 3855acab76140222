#!/bin/sh
# halo's `check`: a primary takes a write (one row, rewritten: a primary
# made read-only, or out of disk, fails it); a replica answers as a standby.
set -eu
. "$(dirname "$0")/lib.sh"
if [ "${HALO_ROLE:-}" = primary ]; then
  # Local durability only: with synchronous replication a commit would
  # also wait for the standby, and a lost standby is not this primary's
  # failure (halo names another).
  sql "set synchronous_commit = local; insert into halo_heartbeat values (1, now()) on conflict (id) do update set at = excluded.at" >/dev/null
else
  standby=$(sql 'select pg_is_in_recovery()')
  [ "$standby" = t ] || { echo "a primary where a replica was expected" >&2; exit 1; }
fi
