#!/usr/bin/env bash
# Install if needed, then run pacsvault on its embedded defaults (no external service).
# First run creates the vault in ./pacsvault-data (or $PACSVAULT_DATA) and writes the
# one-time secrets (recovery code, first administrator) to a file readable by you only
# beside the key (shown on screen too at a terminal, never into a log). Extra arguments go
# to 'pacsvault serve'.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/pacsvault serve "$@"
