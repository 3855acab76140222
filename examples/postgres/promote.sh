#!/bin/sh
# halo's `promote`: this standby becomes the primary (a primary already is).
set -eu
. "$(dirname "$0")/lib.sh"
standby=$(sql 'select pg_is_in_recovery()')
[ "$standby" = f ] && exit 0
promoted=$(sql 'select pg_promote(true, 30)')
[ "$promoted" = t ] || { echo "pg_promote did not finish within 30 s" >&2; exit 1; }
