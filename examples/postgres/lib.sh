# Shared by the PostgreSQL hooks: where the server's programs are, where
# its data is, and how to reach the local instance (always over TCP on
# loopback: no socket directory to share).
BIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$BIN/postgres" ] || { echo "PostgreSQL not found (set PGBIN to its bin directory)" >&2; exit 2; }
PGDATA="$HALO_STATE_DIR/pgdata"
export PGCONNECT_TIMEOUT=3
sql() {
  "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -XAtqv ON_ERROR_STOP=1 -c "$1"
}
