#!/usr/bin/env bash
# A real, throwaway SeaweedFS S3 endpoint for the tests and benchmarks (issue 16): see scripts/weedctl.py.
#   scripts/seaweed.sh start DIR [--s3-port P] [--bucket B]   TLS, signed requests only; prints JSON
#   scripts/seaweed.sh stop DIR   by PID (SIGTERM, then SIGKILL)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="$here/../.venv/bin/python"
[ -x "$py" ] || py=python3
exec "$py" "$here/weedctl.py" "$@"
