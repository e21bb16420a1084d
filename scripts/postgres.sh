#!/usr/bin/env bash
# A real, throwaway PostgreSQL for the tests and benchmarks (issue 16): see scripts/pgctl.py.
#   scripts/postgres.sh start DIR [--port P]   initdb (first time), TLS, SCRAM; prints JSON
#   scripts/postgres.sh stop DIR               pg_ctl stop -m fast, then by PID
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="$here/../.venv/bin/python"
[ -x "$py" ] || py=python3
exec "$py" "$here/pgctl.py" "$@"
