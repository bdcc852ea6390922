#!/usr/bin/env bash
# Creates sdk/python/.venv with the pinned test tools and the SDK installed
# from this directory (editable). Idempotent: does nothing when the venv
# already matches requirements-dev.txt, requirements-dev.lock and
# pyproject.toml (a stamp of their hash is kept inside the venv).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv"
stamp="$venv/.requirements.sha256"
want=$(cat "$here/requirements-dev.txt" "$here/requirements-dev.lock" "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  -r "$here/requirements-dev.txt" -c "$here/requirements-dev.lock"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$here"
echo "$want" > "$stamp"
