#!/usr/bin/env bash
# Validates the helm/tessera chart offline (no cluster, no helm binary):
# render + strict lint with the real Helm engine, values schema,
# kubernetes-validate --strict, checkov, assertions on the YAML and TOML.
#   tests/helm/run.sh [extra pytest args]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
./setup.sh
exec .venv/bin/python -m pytest -q test_chart.py "$@"
