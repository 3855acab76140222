#!/usr/bin/env bash
# Builds a Docker image of a halo binary, so `halo demo-app` runs in a
# container with no registry: the stripped binary, the shared libraries
# `ldd` lists, a static busybox at /bin/busybox when the host has one (for
# commands run inside the container: hooks, exec probes), imported with
# `docker import`. The docker tests build theirs with this script too.
#
#   scripts/demo-image.sh [BINARY] [TAG]     (default: target/release/halo halo-demo:1)
set -euo pipefail

bin="${1:-target/release/halo}"
tag="${2:-halo-demo:1}"
if [ ! -x "$bin" ]; then
  echo "no halo binary at $bin; build it (cargo build --release -p halo) or name one" >&2
  exit 1
fi
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
strip -o "$root/halo" "$bin" 2>/dev/null || cp "$bin" "$root/halo"
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
mkdir -p "$root/tmp"
if [ -x /bin/busybox ]; then
  mkdir -p "$root/bin"
  cp /bin/busybox "$root/bin/busybox"
fi
tar -C "$root" -cf - . | docker import --change 'ENTRYPOINT ["/halo"]' - "$tag" >/dev/null
echo "built $tag from $bin"
