#!/usr/bin/env bash
# Installs the system tools the tests use, from Debian's packages, when they
# are missing. Building halo itself needs only the Rust toolchain.
set -euo pipefail

need=()
command -v kill >/dev/null 2>&1 || need+=(procps)
[ -x /bin/kill ] || need+=(procps)
# A real etcd for the etcd store's conformance suite and the cluster tests.
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
# Network namespaces, veth pairs and a bridge for the multi-node harness.
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
# The cluster script (scripts/cluster.sh smoke) checks the nodes with curl; proxy tests use it as a real client.
command -v curl >/dev/null 2>&1 || need+=(curl)
# The docker tests' image carries a static busybox for hooks and probes
# inside the container.
[ -x /bin/busybox ] || need+=(busybox-static)
# The per-node Docker daemons of the cluster harness start under nsenter and
# setsid; test images are stripped with strip.
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
command -v strip >/dev/null 2>&1 || need+=(binutils)
# The floating IP tests ask which MAC answers for the address.
command -v arping >/dev/null 2>&1 || need+=(iputils-arping)
# Instances run as an unprivileged user that halo makes with useradd.
command -v useradd >/dev/null 2>&1 || need+=(passwd)
# The dashboard test drives the real page in a headless Chromium.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# The stateful tests run real PostgreSQL servers (examples/postgres.toml),
# and psql as their client.
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
# The Redis recipe's test (examples/redis.toml) runs Debian's Redis 7 and
# redis-cli.
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
# The package test builds a .deb and checks its systemd units.
command -v dpkg-deb >/dev/null 2>&1 || need+=(dpkg)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${need[*]}; install them (apt-get install ${need[*]}) or run as root" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

# The docker driver's tests need a Docker Engine (no registry: they build
# their images from the halo binary with strip, ldd and tar). Where the
# engine is installed but its daemon is down, start it.
if command -v dockerd >/dev/null 2>&1 && ! docker info >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  echo "starting dockerd for the docker tests" >&2
  setsid dockerd >/tmp/dockerd.log 2>&1 </dev/null &
  for _ in $(seq 1 100); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
fi
