#!/bin/sh
# halo's `follow`: replicate from the primary at $HALO_PRIMARY_HOST:$HALO_PRIMARY_PORT.
set -eu
. "$(dirname "$0")/lib.sh"
cli replicaof "$HALO_PRIMARY_HOST" "$HALO_PRIMARY_PORT" >/dev/null
