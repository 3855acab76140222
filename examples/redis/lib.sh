# Shared by the Redis hooks: how to reach the local instance.
command -v redis-cli >/dev/null || { echo "redis-cli not found (apt-get install redis-server)" >&2; exit 2; }
cli() {
  out=$(redis-cli -h 127.0.0.1 -p "$PORT" --no-auth-warning "$@") || return 1
  case "$out" in ERR*|READONLY*|NOREPLICAS*|LOADING*) echo "$out" >&2; return 1 ;; esac
  printf '%s\n' "$out"
}
# A field of INFO replication.
info() {
  cli info replication | tr -d '\r' | sed -n "s/^$1://p"
}
