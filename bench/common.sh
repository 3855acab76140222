# Shared by the bench scripts (sourced): tools, the halo build, three nginx
# backends, and stopping everything started on exit. Expects OUT and BASE.

B1=$((BASE + 1)); B2=$((BASE + 2)); B3=$((BASE + 3))

# bench_need CMD:PACKAGE...: installs from Debian's packages what is missing.
bench_need() {
  local need=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

# Builds the release binary; sets HALO.
bench_build() {
  cargo build --release -q -p halo
  HALO=$PWD/target/release/halo
}

PIDS=()
bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap bench_cleanup EXIT

# bench_backends NAME CPU: one nginx worker on CPU answering the same
# 13-byte body on three ports (B1, B2, B3), keep-alive without limit.
bench_backends() {
  local name=$1 cpu=$2
  cat > "$OUT/$name.conf" <<CONF
worker_processes 1;
daemon off;
pid $OUT/$name.pid;
error_log $OUT/$name.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$B1; location / { return 200 "hello, world\n"; } }
  server { listen 127.0.0.1:$B2; location / { return 200 "hello, world\n"; } }
  server { listen 127.0.0.1:$B3; location / { return 200 "hello, world\n"; } }
}
CONF
  taskset -c "$cpu" nginx -c "$OUT/$name.conf" -p "$OUT" &
  PIDS+=($!)
}
