#!/usr/bin/env bash
# The Python SDK's checks: ruff (lint and format), mypy --strict, and the
# pytest suites against a real agent ($TESSERA_BIN or target/debug/tessera)
# with the official MCP Python client and server.
#   sdk/python/run-tests.sh [pytest args]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
./setup.sh
examples=../../examples/mcp/python
.venv/bin/ruff check src tests "$examples"
.venv/bin/ruff format --check src tests "$examples"
.venv/bin/mypy
.venv/bin/mypy --strict "$examples"
exec .venv/bin/python -m pytest -q "$@"
