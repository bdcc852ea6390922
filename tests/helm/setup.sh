#!/usr/bin/env bash
# Creates tests/helm/.venv and installs the pinned requirements.
# Idempotent: does nothing when the venv already holds exactly
# requirements.txt (a stamp of its hash is kept inside the venv).
# The venv is large (helm-python-sdk bundles a ~85 MB Helm library, checkov
# pulls many packages); tests/helm/.gitignore keeps it out of git.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv"
req="$here/requirements.txt"
stamp="$venv/.requirements.sha256"

# Tests running in parallel each call this script: one builds the venv while
# the others wait for it, rather than all removing and creating it at once.
exec 9>"$here/.setup.lock"
flock 9

want=$(sha256sum "$req" | cut -d' ' -f1)
# A venv whose interpreter no longer runs (base Python gone) is rebuilt.
usable() { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c '' 2>/dev/null; }
if usable && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if ! usable; then
  rm -rf "$venv"
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
echo "$want" > "$stamp"
