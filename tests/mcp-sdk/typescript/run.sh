#!/usr/bin/env bash
# The MCP TypeScript SDK against the token service on the HTTPS face:
#   tests/mcp-sdk/typescript/run.sh
# Installs the pinned packages (npm ci, from package-lock.json) when
# node_modules does not match the lock file, compiles with tsc --strict, and
# runs node's test runner under ../agent.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
stamp=node_modules/.package-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  npm ci --no-audit --no-fund --loglevel=error
  echo "$want" > "$stamp"
fi
rm -rf dist
npx tsc -p .
# Node trusts the trust domain's CA (which issued the HTTPS face's
# certificate) through NODE_EXTRA_CA_CERTS, set once the agent is up.
exec ../agent.sh sh -c 'NODE_EXTRA_CA_CERTS="$TESSERA_CA" exec node --test dist/'
