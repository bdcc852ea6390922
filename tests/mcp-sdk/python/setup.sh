#!/usr/bin/env bash
# Creates tests/mcp-sdk/python/.venv and installs the pinned requirements.
# Idempotent: does nothing when the venv already holds exactly
# requirements.txt (a stamp of its hash is kept inside the venv).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv"
req="$here/requirements.txt"
stamp="$venv/.requirements.sha256"

want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
echo "$want" > "$stamp"
