#!/bin/sh
# halo's `position`: the replication offset this instance has processed
# (comparable across a failover: PSYNC2 keeps it; 0 before a replica's
# first synchronisation).
set -eu
. "$(dirname "$0")/lib.sh"
info master_repl_offset
