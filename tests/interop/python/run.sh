#!/usr/bin/env bash
# Runs the py-spiffe / spiffe-tls interop suite against a fresh Tessera agent.
#   tests/interop/python/run.sh [extra pytest args]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
./setup.sh
exec ../agent.sh .venv/bin/python -m pytest -q test_interop.py "$@"
