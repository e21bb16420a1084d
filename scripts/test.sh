#!/usr/bin/env bash
# Install if needed (dcmtk, test tools), then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
echo "== ruff" && .venv/bin/ruff check src tests bench
echo "== mypy" && .venv/bin/mypy
# Parallel by test file (pytest-xdist, --dist loadfile: a module's server fixture starts once).
# The suite mostly waits (deadlines, servers starting, peers), not computes: on 2 cores,
# 2 workers overlap the waits and passed whole even on a machine loaded to 10 (4 workers
# showed timing races). PYTEST_WORKERS=1 runs it serially (~40 min).
workers=${PYTEST_WORKERS:-2}
parallel=()
case " $* " in *" -n "*|*" -n="*|*" --numprocesses"*) ;; *)
  [ "$workers" -gt 1 ] && parallel=(-n "$workers" --dist loadfile) ;;
esac
echo "== pytest" && exec .venv/bin/python -m pytest "${parallel[@]}" "$@"
