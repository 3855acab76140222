#!/bin/sh
# halo's `check`: a primary takes a write transaction; a replica answers
# as a standby.
set -eu
. "$(dirname "$0")/lib.sh"
if [ "${HALO_ROLE:-}" = primary ]; then
  sql "select txid_current()" >/dev/null
else
  standby=$(sql 'select pg_is_in_recovery()')
  [ "$standby" = t ] || { echo "a primary where a replica was expected" >&2; exit 1; }
fi
