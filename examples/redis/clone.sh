#!/bin/sh
# halo's `clone`: a new (or former-primary) replica's data. Redis copies
# the primary's data itself when it follows (a full resync), so this only
# clears what was there.
set -eu
rm -rf "$HALO_STATE_DIR/redis"
mkdir -p "$HALO_STATE_DIR/redis"
