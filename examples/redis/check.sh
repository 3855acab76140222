#!/bin/sh
# halo's `check`: the instance answers in the role halo gave it.
set -eu
. "$(dirname "$0")/lib.sh"
role=$(info role)
if [ "${HALO_ROLE:-}" = primary ]; then
  [ "$role" = master ] || { echo "a replica where the primary was expected" >&2; exit 1; }
else
  [ "$role" = slave ] || { echo "a primary where a replica was expected" >&2; exit 1; }
fi
