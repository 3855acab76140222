# Shared by the bench scripts (sourced): tools, the halo build, three nginx
# backends, the proxies' common config blocks, interleaved rounds, and
# stopping everything started on exit. Expects BASE; OUT defaults to
# bench/out (made absolute here).

OUT=${OUT:-bench/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
B1=$((BASE + 1)); B2=$((BASE + 2)); B3=$((BASE + 3))
TICK=$(getconf CLK_TCK)

# cpu_ticks PID: user + system ticks the process has used.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# bench_start VAR CPU CMD...: starts CMD on CPU in the background, stopped
# on exit; its pid in VAR.
bench_start() {
  local var=$1 cpu=$2
  shift 2
  taskset -c "$cpu" "$@" &
  printf -v "$var" %s $!
  PIDS+=($!)
}

# The three backends as each proxy names them.
bench_halo_upstream() { # [LINE...]: [upstreams.b] (with LINEs) and TCP checks every 2 s
  printf '[upstreams.b]\nendpoints = ["127.0.0.1:%s", "127.0.0.1:%s", "127.0.0.1:%s"]\n' $B1 $B2 $B3
  if [ $# -gt 0 ]; then printf '%s\n' "$@"; fi
  printf '[upstreams.b.health]\ntype = "tcp"\ninterval = "2s"\n'
}
bench_halo_file() { # PORT [LINE...]: one worker, one listener on PORT, every request to upstream b (with LINEs; HALO_ROUTE: the route's lines)
  local port=$1
  shift
  printf '[proxy]\nworkers = 1\n[[listeners]]\nname = "main"\nlisten = "127.0.0.1:%s"\n' "$port"
  printf '[[routes]]\nname = "r"\nupstream = "b"\n%s\n' "${HALO_ROUTE:-}"
  bench_halo_upstream "$@"
}
bench_haproxy_head() { # MODE [GLOBAL...]: one thread, the same timeouts; keep-alive and reuse in http mode
  local mode=$1
  shift
  printf 'global\n  nbthread 1\n  maxconn 8000\n'
  if [ $# -gt 0 ]; then printf '  %s\n' "$@"; fi
  printf 'defaults\n  mode %s\n' "$mode"
  printf '  timeout connect 3s\n  timeout client 30s\n  timeout server 30s\n'
  if [ "$mode" = http ]; then printf '  option http-keep-alive\n  http-reuse always\n'; fi
}
bench_haproxy_backend() { # backend be, round robin, checks every 2 s
  printf 'backend be\n  balance roundrobin\n'
  printf '  server s%s 127.0.0.1:%s check inter 2s\n' 1 $B1 2 $B2 3 $B3
}
bench_nginx_head() { # NAME: one worker, no master, its pid and error log under OUT
  printf 'worker_processes 1;\ndaemon off;\nmaster_process off;\npid %s;\nerror_log %s warn;\n' \
    "$OUT/$1.pid" "$OUT/$1.err"
  printf 'events { worker_connections 16384; }\n'
}
bench_nginx_servers() { # the upstream block's server lines
  printf '    server 127.0.0.1:%s;\n' $B1 $B2 $B3
}
bench_nginx_http_upstream() { # in http {}: no access log, upstream b with 256 idle keep-alive connections
  printf '  access_log off;\n  keepalive_requests 1000000;\n  upstream b {\n'
  bench_nginx_servers
  printf '    keepalive 256;\n  }\n'
}

# bench_interleave FN: ROUNDS rounds over halo, HAProxy and nginx (their
# ports and pids in P_* and *_PID), the order rotated each round so machine
# noise hits all alike; calls FN ROUND NAME PORT PID for each.
bench_interleave() {
  local round k name port pid
  for round in $(seq "$ROUNDS"); do
    local order=("halo $P_HALO $HALO_PID" "haproxy $P_HAPROXY $HAPROXY_PID" "nginx $P_NGINX $NGINX_PID")
    for k in 0 1 2; do
      read -r name port pid <<< "${order[$(( (k + round) % 3 ))]}"
      "$1" "$round" "$name" "$port" "$pid"
    done
    echo "round $round done" >&2
  done
}

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
# HALO_BIN=PATH measures another build (an older commit's) instead.
bench_build() {
  if [ -n "${HALO_BIN:-}" ]; then
    HALO=$HALO_BIN
    return
  fi
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
  { bench_halo_file "$P_HALO" 'policy = "round_robin"'; echo "${HALO_EXTRA:-}"; } > "$OUT/halo.toml"
  HALO_LOG=warn bench_start HALO_PID "$PROXY_CPU" "$HALO" proxy -c "$OUT/halo.toml" > "$OUT/halo.out"
  
  # --- HAProxy: one thread, keep-alive both sides, connection reuse
  cat > "$OUT/haproxy.cfg" <<CONF
$(bench_haproxy_head http)
frontend fe
  bind 127.0.0.1:$P_HAPROXY${H2:+ proto h2}
  default_backend be
  option forwardfor
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  unique-id-format %{+X}o%ci%cp%Ts%rt%pid
  unique-id-header X-Request-ID
$(bench_haproxy_backend)
CONF
  bench_start HAPROXY_PID "$PROXY_CPU" haproxy -db -f "$OUT/haproxy.cfg" > "$OUT/haproxy.out" 2>&1
  
  # --- nginx as a proxy: one worker, upstream keep-alive
  cat > "$OUT/nginx-proxy.conf" <<CONF
$(bench_nginx_head nginx-proxy)
http {
$(bench_nginx_http_upstream)
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
  bench_start NGINX_PID "$PROXY_CPU" nginx -c "$OUT/nginx-proxy.conf" -p "$OUT"
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
