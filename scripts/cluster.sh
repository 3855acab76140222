#!/usr/bin/env bash
# A three-node halo cluster on one machine, for trying it out: each node in
# its own network namespace (10.214.0.11-13 on a bridge, reachable from this
# shell), with its own etcd member (a 3-member etcd cluster) and its own
# `halo agent`, and a floating IP ($NET.100, `[[vip]]` in every node file)
# held by one of them. Needs root, iproute2 and etcd
# (scripts/install-test-deps.sh).
#
#   scripts/cluster.sh up       # start it; prints what to try
#   scripts/cluster.sh status   # halo status as node n1 sees it
#   scripts/cluster.sh down     # stop everything and remove the namespaces
#   scripts/cluster.sh smoke    # up, deploy, check every node serves, down
#
# HALO_BIN picks the binary [default: $CARGO_TARGET_DIR/release/halo, or
# target/release/halo, built if missing]. State and logs go to
# HALO_CLUSTER_DIR [default: /var/tmp/halo-cluster, outside the repository:
# three etcd members and three data directories take a few hundred MB].
# A failed `up` says which log tells why, and takes down what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=(n1 n2 n3)
BRIDGE=hbdemo
NET=10.214.0
VIP=$NET.100
STATE=${HALO_CLUSTER_DIR:-/var/tmp/halo-cluster}

ip_of() { echo "$NET.$((10 + ${1#n}))"; }
ns_of() { echo "halodemo-$1"; }

bin() {
  if [ -n "${HALO_BIN:-}" ]; then echo "$HALO_BIN"; return; fi
  local target=${CARGO_TARGET_DIR:-$PWD/target}
  case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
  if [ ! -x "$target/release/halo" ]; then cargo build --release -p halo >&2; fi
  echo "$target/release/halo"
}

down() {
  for n in "${NODES[@]}"; do
    local ns; ns=$(ns_of "$n")
    if ip netns list | grep -qw "$ns"; then
      ip netns pids "$ns" | xargs -r kill -9 2>/dev/null || true
      ip link del "hvdemo${n#n}" 2>/dev/null || true
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  for dir in -i -o; do
    while iptables -D FORWARD "$dir" "$BRIDGE" -j ACCEPT 2>/dev/null; do :; done
  done
  echo "cluster down (state kept in $STATE)"
}

wait_for() { # what, seconds, log (or -), command...
  local what=$1 secs=$2 log=$3; shift 3
  for _ in $(seq 1 $((secs * 10))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "timed out after ${secs}s waiting for $what" >&2
  if [ "$log" != - ]; then
    echo "the last lines of $log (the whole of it says why):" >&2
    tail -n 15 "$log" >&2 || true
  fi
  return 1
}

# A failed `up` leaves nothing running (its logs stay in $STATE).
failed_up() {
  echo "scripts/cluster.sh up failed; taking down what it started" >&2
  down >&2
  exit 1
}

up() {
  [ "$(id -u)" -eq 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
  command -v etcd >/dev/null || { echo "etcd not found: run scripts/install-test-deps.sh" >&2; exit 1; }
  local halo; halo=$(bin)
  down >/dev/null
  trap failed_up ERR
  rm -rf "$STATE"
  mkdir -p "$STATE"
  ip link add "$BRIDGE" type bridge
  ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # Docker's FORWARD policy is DROP and bridged packets may pass through it.
  for dir in -i -o; do iptables -I FORWARD "$dir" "$BRIDGE" -j ACCEPT 2>/dev/null || true; done
  local initial="" stores=""
  for n in "${NODES[@]}"; do
    initial+="${initial:+,}$n=http://$(ip_of "$n"):2380"
    stores+="${stores:+,}$(ip_of "$n"):2379"
  done
  for n in "${NODES[@]}"; do
    local ns ip; ns=$(ns_of "$n"); ip=$(ip_of "$n")
    ip netns add "$ns"
    ip link add "hvdemo${n#n}" type veth peer name "hpdemo${n#n}"
    ip link set "hvdemo${n#n}" master "$BRIDGE" up
    ip link set "hpdemo${n#n}" netns "$ns"
    ip netns exec "$ns" ip link set "hpdemo${n#n}" name eth0
    ip netns exec "$ns" ip addr add "$ip/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    ip netns exec "$ns" ip link set lo up
    mkdir -p "$STATE/$n"
    ip netns exec "$ns" etcd --name "$n" --data-dir "$STATE/$n/etcd" \
      --listen-client-urls "http://$ip:2379" --advertise-client-urls "http://$ip:2379" \
      --listen-peer-urls "http://$ip:2380" --initial-advertise-peer-urls "http://$ip:2380" \
      --initial-cluster "$initial" --initial-cluster-state new \
      --heartbeat-interval 100 --election-timeout 1000 --pre-vote=true --logger zap --log-level warn \
      >"$STATE/$n/etcd.log" 2>&1 &
    disown
  done
  for n in "${NODES[@]}"; do
    wait_for "etcd on $n" 30 "$STATE/$n/etcd.log" curl -sf "http://$(ip_of "$n"):2379/health" || failed_up
  done
  # The cluster's API token, given to every agent (the store keeps only
  # its digest; an agent with another token is refused).
  (umask 077; od -An -N24 -tx1 /dev/urandom | tr -d ' \n' > "$STATE/token")
  for n in "${NODES[@]}"; do
    local ns ip; ns=$(ns_of "$n"); ip=$(ip_of "$n")
    printf '[node]\napi = "%s:7070"\n\n[[listeners]]\nname = "http"\nlisten = "%s:8080"\n\n[[listeners]]\nname = "vip"\nlisten = "%s:8080"\n\n[[vip]]\naddress = "%s/24"\ninterface = "eth0"\n' \
      "$ip" "$ip" "$VIP" "$VIP" >"$STATE/$n/node.toml"
    # Each node its own TMPDIR and runtime directory, as separate hosts have
    # (listeners' address claims live there, and every node listens on the
    # floating IP).
    mkdir -p "$STATE/$n/tmp"
    TMPDIR="$STATE/$n/tmp" HALO_RUN_DIR="$STATE/$n/run" HALO_LOG=${HALO_LOG:-info} ip netns exec "$ns" "$halo" agent --store "etcd://$stores" --node "$n" \
      --advertise "$ip" -c "$STATE/$n/node.toml" --data-dir "$STATE/$n/data" --token-file "$STATE/token" >"$STATE/$n/agent.log" 2>&1 &
    disown
  done
  for n in "${NODES[@]}"; do
    wait_for "halo agent on $n" 30 "$STATE/$n/agent.log" grep -q '^ready' "$STATE/$n/agent.log" || failed_up
  done
  trap - ERR
  cat <<EOF
cluster up: nodes n1 n2 n3 at $(ip_of n1) $(ip_of n2) $(ip_of n3); proxies on :8080, APIs on :7070; logs in $STATE/NODE/
try:
  export HALO_API=$(ip_of n1):7070 HALO_DATA_DIR=$STATE/n1/data   # the CLI talks to n1
  alias h=$halo
  h apply -f examples/app.toml        # any node's API will do
  h status                            # nodes, leader, placements, readiness
  curl -H 'Host: web.localhost' $(ip_of n2):8080/     # every node's proxy serves every service
  curl -H 'Host: web.localhost' $VIP:8080/      # the floating IP, on one node at a time
  h vip list                          # who holds it, since when, its fencing token
  ip netns pids $(ns_of n2) | xargs kill -9          # lose a node: its instances come back elsewhere
                                      # (kill the VIP's holder: it answers from another node in ~1.5 s)
  h node drain n3 ; h node undrain n3
  scripts/cluster.sh down
EOF
}

status() {
  HALO_API="$(ip_of n1):7070" HALO_DATA_DIR="$STATE/n1/data" "$(bin)" status
}

smoke() {
  trap down EXIT
  up
  local halo; halo=$(bin)
  export HALO_API="$(ip_of n1):7070" HALO_DATA_DIR="$STATE/n1/data"
  local h=("$halo")
  "${h[@]}" apply -f examples/app.toml
  for n in "${NODES[@]}"; do
    wait_for "web served through $n" 30 "$STATE/$n/agent.log" curl -sf -H 'Host: web.localhost' "http://$(ip_of "$n"):8080/"
    echo "$n serves: $(curl -s -H 'Host: web.localhost' "http://$(ip_of "$n"):8080/")"
  done
  wait_for "web served through the floating IP $VIP" 30 - curl -sf -H 'Host: web.localhost' "http://$VIP:8080/"
  echo "$VIP serves: $(curl -s -H 'Host: web.localhost' "http://$VIP:8080/")"
  "${h[@]}" node list
  "${h[@]}" vip list
  echo "cluster smoke test passed"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  smoke) smoke ;;
  *) echo "usage: $0 up|status|down|smoke" >&2; exit 2 ;;
esac
