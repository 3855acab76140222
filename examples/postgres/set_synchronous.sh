#!/bin/sh
# halo's `set_synchronous`: the standby each commit waits for.
# $HALO_SYNC_STANDBYS names it (an instance, its application_name: see
# follow.sh), or is empty: then no standby ("on": the primary goes on
# alone) or, with HALO_SYNCHRONOUS=strict, any standby (commits wait until
# one is connected). synchronous_commit stays `on` (the default): a commit
# returns once the standby has flushed it.
set -eu
. "$(dirname "$0")/lib.sh"
want=${HALO_SYNC_STANDBYS:-}
case "$want" in *[!A-Za-z0-9_.-]*) echo "not an instance name: '$want'" >&2; exit 2 ;; esac
if [ -n "$want" ]; then names="\"$want\""
elif [ "${HALO_SYNCHRONOUS:-}" = strict ]; then names='*'
else names=''
fi
sql "alter system set synchronous_standby_names = '$names'" >/dev/null
sql "select pg_reload_conf()" >/dev/null
[ "$names" = '*' ] && exit 0
# Returns once every WAL sender has read the new setting: none but the
# named standby may release a waiting commit any more (pg_stat_replication's
# sync_priority is what each sender set for itself).
i=0
while [ "$(sql "select count(*) from pg_stat_replication where sync_priority > 0 and application_name <> '$want'")" != 0 ]; do
  i=$((i + 1))
  [ $i -lt 250 ] || { echo "the WAL senders did not take the new synchronous_standby_names within 5 s" >&2; exit 1; }
  sleep 0.02
done
