#!/bin/sh
# halo's `promote`: this replica becomes the primary (Redis keeps its
# replication id and offset, so the others continue from it).
set -eu
. "$(dirname "$0")/lib.sh"
cli replicaof no one >/dev/null
[ "$(info role)" = master ] || { echo "still a replica after REPLICAOF NO ONE" >&2; exit 1; }
