#!/bin/sh
# halo's `promote`: this standby becomes the primary (a primary already
# is). Each term's fencing token (HALO_TOKEN) goes in halo_term, so an
# application can stamp its writes with `select max(token) from halo_term`.
set -eu
. "$(dirname "$0")/lib.sh"
standby=$(sql 'select pg_is_in_recovery()')
if [ "$standby" = t ]; then
  promoted=$(sql 'select pg_promote(true, 30)')
  [ "$promoted" = t ] || { echo "pg_promote did not finish within 30 s" >&2; exit 1; }
fi
# Local durability: no standby is named for this term yet.
sql "set synchronous_commit = local;
  create table if not exists halo_term (token bigint primary key, at timestamptz not null);
  insert into halo_term values (${HALO_TOKEN:-0}, now()) on conflict do nothing" >/dev/null
