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

# bench_proxies CPU: halo, HAProxy and nginx, each with one worker on CPU,
# keep-alive both sides, round robin over B1..B3 with TCP checks every 2 s,
# the same request headers; on ports P_HALO, P_HAPROXY, P_NGINX (BASE+10..12).
# Sets HALO_PID, HAPROXY_PID, NGINX_PID. HALO_EXTRA is appended to halo's file;
# H2=1 makes HAProxy and nginx listen for HTTP/2 prior knowledge (h2c; halo
# detects it on the same listener).
bench_proxies() {
  local PROXY_CPU=$1
  P_HALO=$((BASE + 10)); P_HAPROXY=$((BASE + 11)); P_NGINX=$((BASE + 12))
  # --- halo
  cat > "$OUT/halo.toml" <<CONF
[proxy]
workers = 1
[[listeners]]
name = "main"
listen = "127.0.0.1:$P_HALO"
[[routes]]
upstream = "b"
[upstreams.b]
policy = "round_robin"
endpoints = ["127.0.0.1:$B1", "127.0.0.1:$B2", "127.0.0.1:$B3"]
[upstreams.b.health]
type = "tcp"
interval = "2s"
${HALO_EXTRA:-}
CONF
  HALO_LOG=warn taskset -c $PROXY_CPU "$HALO" proxy -c "$OUT/halo.toml" > "$OUT/halo.out" &
  HALO_PID=$!
  PIDS+=($HALO_PID)
  
  # --- HAProxy: one thread, keep-alive both sides, connection reuse
  cat > "$OUT/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 3s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:$P_HAPROXY${H2:+ proto h2}
  default_backend be
  option forwardfor
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  unique-id-format %{+X}o%ci%cp%Ts%rt%pid
  unique-id-header X-Request-ID
backend be
  balance roundrobin
  server s1 127.0.0.1:$B1 check inter 2s
  server s2 127.0.0.1:$B2 check inter 2s
  server s3 127.0.0.1:$B3 check inter 2s
CONF
  taskset -c $PROXY_CPU haproxy -db -f "$OUT/haproxy.cfg" > "$OUT/haproxy.out" 2>&1 &
  HAPROXY_PID=$!
  PIDS+=($HAPROXY_PID)
  
  # --- nginx as a proxy: one worker, upstream keep-alive
  cat > "$OUT/nginx-proxy.conf" <<CONF
worker_processes 1;
daemon off;
master_process off;
pid $OUT/nginx-proxy.pid;
error_log $OUT/nginx-proxy.err warn;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream b {
    server 127.0.0.1:$B1;
    server 127.0.0.1:$B2;
    server 127.0.0.1:$B3;
    keepalive 256;
  }
  server {
    listen 127.0.0.1:$P_NGINX${H2:+ http2};
    location / {
      proxy_pass http://b;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
      proxy_set_header X-Request-ID \$request_id;
      proxy_set_header Forwarded "for=\$remote_addr;proto=\$scheme;host=\$host";
    }
  }
}
CONF
  taskset -c $PROXY_CPU nginx -c "$OUT/nginx-proxy.conf" -p "$OUT" &
  NGINX_PID=$!
  PIDS+=($NGINX_PID)
}

# bench_wait_up PORT...: each answers HTTP within 5 s, or the script stops.
bench_wait_up() {
  local port
  for port in "$@"; do
    for _ in $(seq 100); do
      curl -sf -o /dev/null "http://127.0.0.1:$port/" && break
      sleep 0.05
    done
    curl -sf -o /dev/null "http://127.0.0.1:$port/" || { echo "port $port did not come up" >&2; exit 1; }
  done
}

# bench_backends_split NAME CPU: like bench_backends, but each port its own
# nginx process (no master), so one can be frozen alone; sets BPIDS.
bench_backends_split() {
  local name=$1 cpu=$2 port
  BPIDS=()
  for port in $B1 $B2 $B3; do
    cat > "$OUT/$name-$port.conf" <<CONF
worker_processes 1;
master_process off;
daemon off;
pid $OUT/$name-$port.pid;
error_log $OUT/$name-$port.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$port; location / { return 200 "hello, world\n"; } }
}
CONF
    taskset -c "$cpu" nginx -c "$OUT/$name-$port.conf" -p "$OUT" &
    BPIDS+=($!)
    PIDS+=($!)
  done
}
