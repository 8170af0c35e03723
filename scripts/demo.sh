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

echo "== starting the server on ${USEREXPORT_LISTEN:-127.0.0.1:50051}"
.venv/bin/userexport-server serve >"$USEREXPORT_DATA_DIR/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  .venv/bin/userexport-server health >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { cat "$USEREXPORT_DATA_DIR/server.log"; exit 1; }
  sleep 0.2
done

echo "== exporting every user as CSV (the CLI mints a local token from the server's data dir)"
.venv/bin/userexport export --format csv --wait --output "$USEREXPORT_DATA_DIR/users.csv.gz"
echo "== first lines of $USEREXPORT_DATA_DIR/users.csv.gz"
{ gzip -dc "$USEREXPORT_DATA_DIR/users.csv.gz" || true; } | head -n 4  # head closes the pipe early

echo "== five users of connection $connection, three fields, as NDJSON"
.venv/bin/userexport export --format json --connection "$connection" --field email \
  --field 'identities[0].connection=provider' --field user_metadata.preferences --limit 5 --wait \
  --output "$USEREXPORT_DATA_DIR/users.json.gz"
gzip -dc "$USEREXPORT_DATA_DIR/users.json.gz"

echo "== jobs of this tenant"
.venv/bin/userexport jobs list
