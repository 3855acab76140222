#!/usr/bin/env bash
# Builds a Debian package of halo: the binary, systemd units for `halo up`,
# `halo agent` and `halo proxy`, default files under /etc/halo, a system
# user `halo`, shell completions and manual pages.
#
#   scripts/package.sh                 # cargo build --release, then target/debian/halo_VERSION_ARCH.deb
#   scripts/package.sh --bin PATH      # package this binary instead (no build)
#   scripts/package.sh --out DIR       # where the .deb goes
#   scripts/package.sh --fast          # quicker compression (tests)
#
# Install with `apt install ./halo_VERSION_ARCH.deb`; nothing starts by
# itself: `systemctl enable --now halo-up` (or halo-agent, halo-proxy).
# Needs dpkg-deb (Debian's dpkg) and strip (binutils).
set -euo pipefail
cd "$(dirname "$0")/.."

bin="" out="" fast=0
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --fast) fast=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "package.sh: unknown argument '$1'; accepted: --bin PATH, --out DIR, --fast" >&2; exit 2 ;;
  esac
done
for tool in dpkg-deb strip gzip; do
  command -v "$tool" >/dev/null 2>&1 || { echo "package.sh: $tool is missing (apt-get install dpkg binutils gzip)" >&2; exit 1; }
done
target="${CARGO_TARGET_DIR:-$PWD/target}"
if [ -z "$bin" ]; then
  cargo build --release -p halo
  bin="$target/release/halo"
fi
[ -x "$bin" ] || { echo "package.sh: $bin is not an executable" >&2; exit 1; }
out="${out:-$target/debian}"
mkdir -p "$out"

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
arch="$(dpkg --print-architecture)"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT

install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/halo" "$root/etc/default" \
  "$root/usr/share/man/man1" "$root/usr/share/doc/halo" "$root/usr/share/bash-completion/completions" \
  "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
install -m 0755 "$bin" "$root/usr/bin/halo"
strip --strip-debug "$root/usr/bin/halo"
install -m 0644 deploy/systemd/*.service "$root/lib/systemd/system/"
install -m 0644 deploy/etc/halo.toml deploy/etc/agent.toml deploy/etc/proxy.toml "$root/etc/halo/"
install -m 0644 deploy/etc/halo-agent.default "$root/etc/default/halo-agent"
"$root/usr/bin/halo" completions bash > "$root/usr/share/bash-completion/completions/halo"
"$root/usr/bin/halo" completions zsh > "$root/usr/share/zsh/vendor-completions/_halo"
"$root/usr/bin/halo" completions fish > "$root/usr/share/fish/vendor_completions.d/halo.fish"
"$root/usr/bin/halo" man --dir "$root/usr/share/man/man1" >/dev/null
gzip -9n "$root"/usr/share/man/man1/*.1
install -m 0644 LICENSE "$root/usr/share/doc/halo/copyright"
install -m 0644 README.md "$root/usr/share/doc/halo/README.md"
install -m 0644 deploy/grafana/halo.json "$root/usr/share/doc/halo/grafana-dashboard.json"

cat > "$root/DEBIAN/control" <<CONTROL
Package: halo
Version: $version
Architecture: $arch
Maintainer: halo developers <halo@localhost>
Depends: libc6, adduser
Section: net
Priority: optional
Installed-Size: $(du -ks "$root" | cut -f1)
Description: load balancing, multi-node deployment and fault recovery in one binary
 halo runs an application highly available across machines: an L7/L4
 proxy with health checks, retries and hot reload, a supervisor that
 restarts and reschedules instances, rolling and canary releases with
 automatic rollback, backups, floating IPs, and a cluster on etcd.
CONTROL
printf '%s\n' /etc/halo/halo.toml /etc/halo/agent.toml /etc/halo/proxy.toml /etc/default/halo-agent > "$root/DEBIAN/conffiles"
cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  install -d -m 0700 /var/lib/halo
  if ! getent passwd halo >/dev/null; then
    adduser --system --group --home /var/lib/halo --no-create-home --gecos "halo" halo >/dev/null
  fi
  # The applications' own user: nothing of halo's is readable to it.
  if ! getent passwd halo-app >/dev/null; then
    adduser --system --group --home /nonexistent --no-create-home --gecos "halo instances" halo-app >/dev/null
  fi
  chown halo:halo /var/lib/halo
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
  fi
  echo "halo installed; start it with: systemctl enable --now halo-up (or halo-agent, halo-proxy)"
fi
POSTINST
cat > "$root/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
  for u in halo-up halo-agent halo-proxy; do
    systemctl stop "$u.service" >/dev/null 2>&1 || true
  done
fi
PRERM
cat > "$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
  rm -rf /var/lib/halo
  if getent passwd halo >/dev/null; then
    deluser --system halo >/dev/null 2>&1 || true
  fi
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
POSTRM
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

deb="$out/halo_${version}_${arch}.deb"
if [ "$fast" = 1 ]; then
  dpkg-deb --root-owner-group -Zgzip -z1 --build "$root" "$deb" >/dev/null
else
  dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
fi
echo "$deb"
