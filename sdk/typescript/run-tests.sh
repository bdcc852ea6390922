#!/usr/bin/env bash
# The TypeScript SDK's checks: npm ci (pinned by package-lock.json), tsc
# --strict for the SDK and its tests, prettier, and the node:test suites
# against a real agent ($TESSERA_BIN or target/debug/tessera) with the
# official MCP TypeScript client and server.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
major=$(node -p "process.versions.node.split('.')[0]" 2>/dev/null || echo 0)
[ "$major" -ge 20 ] || { echo "sdk/typescript/run-tests.sh: node >= 20 is required (found: $(node --version 2>/dev/null || echo none))" >&2; exit 2; }
stamp=node_modules/.package-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  npm ci --no-audit --no-fund --ignore-scripts
  echo "$want" > "$stamp"
fi
npm run --silent format:check
npm test
