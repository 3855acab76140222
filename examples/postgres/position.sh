#!/bin/sh
# halo's `position`: the WAL position this instance has (an LSN).
set -eu
. "$(dirname "$0")/lib.sh"
sql "select case when pg_is_in_recovery()
  then greatest(coalesce(pg_last_wal_replay_lsn(), '0/0'), coalesce(pg_last_wal_receive_lsn(), '0/0'))
  else pg_current_wal_lsn() end"
