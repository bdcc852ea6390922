#!/usr/bin/env bash
# The MCP Python SDK against the token service on the HTTPS face:
#   tests/mcp-sdk/python/run.sh [extra pytest args]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
./setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy --strict test_mcp_python.py test_resource_server.py
exec ../agent.sh .venv/bin/python -m pytest -q test_mcp_python.py test_resource_server.py "$@"
