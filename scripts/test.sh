#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the whole test suite (the README's test command).
# Extra arguments go to pytest, e.g. scripts/test.sh -k watch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh

# PostgreSQL: the suite runs against it as well as SQLite; start the local cluster if it is down.
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
fi

echo "== generated code is up to date"
.venv/bin/python scripts/gen_protos.py --check
echo "== Dockerfile lint"
.venv/bin/hadolint Dockerfile
echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy client/userexport server/userexport_server tests bench
echo "== buf lint"
.tools/node_modules/.bin/buf lint
# The working tree (uncommitted edits included) against the commit before HEAD: on a merge, main as
# it was. A clone with no such commit (the first one, or shallow) has nothing to compare with.
echo "== buf breaking"
if git rev-parse -q --verify 'HEAD~1^{commit}' >/dev/null; then
  .tools/node_modules/.bin/buf breaking --against '.git#ref=HEAD~1'
else
  echo "no commit before HEAD (first commit or shallow clone): nothing to compare the protos with"
fi
echo "== tests"
# Two processes (pytest-xdist), one per core: each test makes its own servers, databases and ports,
# and the faults that restart PostgreSQL restart a cluster of their own. -n 0 runs them in one.
set +e
.venv/bin/python -m pytest -n 2 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$status"
