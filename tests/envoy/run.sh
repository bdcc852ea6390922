#!/usr/bin/env bash
# The Envoy SDS suite: two real Envoys take their certificates and bundles
# from a Tessera agent over SDS, with the bootstraps in docs/envoy.md.
#   tests/envoy/run.sh [extra pytest args]
# Needs root (the Envoys run as other uids, which is how the agent tells them
# apart), setpriv (util-linux) and a built agent (`cargo build -p
# tessera-agent`, or TESSERA_BIN). The suite's own code is checked first
# (ruff, mypy --strict).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
[ "$(id -u)" = 0 ] || { echo "tests/envoy/run.sh: must run as root (Envoys run as other uids)" >&2; exit 2; }
command -v setpriv >/dev/null || { echo "tests/envoy/run.sh: setpriv (util-linux) is required" >&2; exit 2; }
venv=$(./setup.sh)
"$venv/bin/ruff" check --quiet test_envoy.py
"$venv/bin/ruff" format --quiet --check test_envoy.py
"$venv/bin/mypy" --strict --no-error-summary --cache-dir=/dev/null test_envoy.py
exec "$venv/bin/python" -m pytest -q test_envoy.py "$@"
