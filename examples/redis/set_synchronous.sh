#!/bin/sh
# halo's `set_synchronous` for Redis. Redis replication is asynchronous:
# there is no standby a write waits for. The nearest it has is
# min-replicas-to-write: the primary refuses writes while fewer replicas
# than that are connected and acknowledged within min-replicas-max-lag
# seconds. With a standby named (or "strict") this sets 1; with none, 0.
# A client that needs a given write on a replica asks WAIT 1 TIMEOUT
# after it: that is Redis's synchronous write, per write.
set -eu
. "$(dirname "$0")/lib.sh"
n=0
if [ -n "${HALO_SYNC_STANDBYS:-}" ] || [ "${HALO_SYNCHRONOUS:-}" = strict ]; then n=1; fi
cli config set min-replicas-to-write "$n" >/dev/null
cli config set min-replicas-max-lag 2 >/dev/null
