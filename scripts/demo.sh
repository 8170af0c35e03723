#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the main job end to end on the embedded defaults:
# start the server (SQLite + local files), seed sample users, export them with the CLI (live
# progress from WatchJob, download over the signed URL), show the first lines, stop the server.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh

export USEREXPORT_DATA_DIR=${USEREXPORT_DATA_DIR:-data/demo}
USERS=${DEMO_USERS:-200000}
rm -rf "$USEREXPORT_DATA_DIR" && mkdir -p "$USEREXPORT_DATA_DIR"
echo "== seeding $USERS sample users into $USEREXPORT_DATA_DIR"
seeded=$(.venv/bin/userexport-server seed --users "$USERS")
echo "$seeded"
connection=$(echo "$seeded" | sed -n 's/.*over connections \(con_[A-Za-z0-9]*\).*/\1/p')

# Ports of its own, every one of them: port 0 lets the OS pick free ones (USEREXPORT_LISTEN,
# USEREXPORT_FILES_LISTEN and USEREXPORT_METRICS_LISTEN set fixed ones; an empty metrics address
# turns metrics off), and the server's own log says which, so a server already on 50051, 50052 or
# 9464 (the "Using it" one) is left alone. A fixed port in use ends the demo with the server's line
# naming it.
export USEREXPORT_LISTEN=${USEREXPORT_LISTEN:-127.0.0.1:0}
export USEREXPORT_FILES_LISTEN=${USEREXPORT_FILES_LISTEN:-127.0.0.1:0}
export USEREXPORT_METRICS_LISTEN=${USEREXPORT_METRICS_LISTEN-127.0.0.1:0}
log="$USEREXPORT_DATA_DIR/server.log"
: >"$log"  # before the first read below: the background shell opens it later
echo "== starting the server"
.venv/bin/userexport-server serve >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
port=""
for _ in $(seq 300); do
  port=$(sed -n 's/.*msg=server started .* port=\([0-9]*\).*/\1/p' "$log")
  [ -n "$port" ] && break
  if ! kill -0 $server 2>/dev/null; then
    { grep '^userexport-server: ' "$log" || tail -n 1 "$log"; } | sed 's/^/demo: the server did not start: /' >&2
    exit 1
  fi
  sleep 0.2
done
[ -n "$port" ] || { echo "demo: the server did not start within 60 s; see $log" >&2; exit 1; }
host=${USEREXPORT_LISTEN%:*}
[ "$host" = 0.0.0.0 ] && host=127.0.0.1
export USEREXPORT_SERVER="$host:$port"
files=$(sed -n 's/.*msg=local storage serving .* listen=\([^ ]*\) .*/\1/p' "$log")
metrics_port=$(sed -n 's/.*msg=server started .* metrics_port=\([0-9]*\).*/\1/p' "$log")
echo "== server on $USEREXPORT_SERVER (gRPC), downloads on $files, metrics on port $metrics_port (0: off)"

echo "== exporting every user as CSV (the CLI mints a local token from the server's data dir)"
.venv/bin/userexport export --format csv --wait --output "$USEREXPORT_DATA_DIR/users.csv.gz"
echo "== first lines of $USEREXPORT_DATA_DIR/users.csv.gz"
{ gzip -dc "$USEREXPORT_DATA_DIR/users.csv.gz" || true; } | head -n 4  # head closes the pipe early

echo "== the tenant's connections"
.venv/bin/userexport connections list
echo "== five users of connection Username-Password-Authentication ($connection), three fields, as NDJSON"
.venv/bin/userexport export --format json --connection Username-Password-Authentication --field email \
  --field 'identities[0].connection=provider' --field user_metadata.preferences --limit 5 --wait \
  --output "$USEREXPORT_DATA_DIR/users.json.gz"
gzip -dc "$USEREXPORT_DATA_DIR/users.json.gz"

echo "== jobs of this tenant"
.venv/bin/userexport jobs list
