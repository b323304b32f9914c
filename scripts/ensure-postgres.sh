#!/usr/bin/env bash
# Make sure a Postgres answers at 127.0.0.1:5432 and that a fresh, empty test database exists.
# On this project's machines Postgres is preinstalled (trust auth); elsewhere see README.md.
set -euo pipefail
admin_url=${1:-postgresql://postgres@127.0.0.1:5432/postgres}
test_db=${2:-gradhealth_test}

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "Postgres is down: starting the local cluster" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
fi
pg_isready -h 127.0.0.1 -p 5432 >/dev/null || {
  echo "No Postgres at 127.0.0.1:5432: start one (README.md, 'Postgres for the tests')" >&2
  exit 1
}
psql -q "$admin_url" -v ON_ERROR_STOP=1 -c "DROP DATABASE IF EXISTS $test_db WITH (FORCE)" \
  -c "CREATE DATABASE $test_db"
