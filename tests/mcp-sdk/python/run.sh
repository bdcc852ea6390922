#!/usr/bin/env bash
# The MCP Python SDK against the token service on the HTTPS face:
#   tests/mcp-sdk/python/run.sh [extra pytest args]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
./setup.sh
.venv/bin/ruff check test_mcp_python.py
.venv/bin/ruff format --check test_mcp_python.py
.venv/bin/mypy --strict test_mcp_python.py
exec ../agent.sh .venv/bin/python -m pytest -q test_mcp_python.py "$@"
