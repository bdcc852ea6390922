#!/usr/bin/env bash
# Per-task tokens for MCP tool calls: an agent stand-in trades its SPIFFE
# identity for a token scoped to one task, and an MCP server (rmcp) behind
# tessera-token-guard checks every call. Both programs are told apart by the
# agent from their executable path (unix:path selector). Then the same with
# the SDKs: a Python MCP server (official MCP Python SDK + tessera_sdk), and
# a Python agent, a TypeScript agent and a LangGraph agent calling it.
#
#   examples/mcp/demo.sh          # builds what it needs, prints every step
#
# Exit status 0 only if: a permitted tool call succeeds; a call outside the
# task's scopes gets 403; after the task ends its token gets 401; a scope no
# policy grants is refused at the exchange; a delete waits for an operator's
# approval and then succeeds; an unmodified MCP SDK client finds Tessera's
# https issuer in the server's metadata and its token works; the SDK agents
# step up on 403 within what their task may hold and are refused beyond it;
# and the audit log's hash chain verifies.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
[ -n "${TESSERA_PREBUILT:-}" ] || cargo build -q --locked -p tessera-agent -p tessera-mcp-example  # scripts/test.sh builds everything once
# The real path: unix:path selectors match the executable the kernel reports,
# and target/ may be a link (CI keeps the build directory in a cache).
bin=$(cd "$root/target/debug" && pwd -P)
# The SDKs and their examples: a venv with the pinned packages, the
# TypeScript SDK built and the TypeScript agent compiled against it.
sdk/python/setup.sh
python="$root/sdk/python/.venv/bin/python"
(cd sdk/typescript && { [ -d node_modules ] || npm ci --no-audit --no-fund --ignore-scripts; } && npm run --silent build)
(cd examples/mcp/typescript && npm ci --no-audit --no-fund --ignore-scripts >/dev/null && npm run --silent build)
dir=$(mktemp -d /tmp/tessera-mcp.XXXXXX)
uid=$(id -u)
mkdir -p "$dir/admin"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# The HTTPS face: the issuer MCP servers name in their Protected Resource
# Metadata, where unmodified MCP clients find the token service.
https_port=$(free_port)
issuer="https://localhost:$https_port"
cat > "$dir/agent.toml" <<TOML
trust_domain = "example.org"
socket_path  = "$dir/sock/agent.sock"
data_dir     = "$dir/data"

[admin]
socket_path = "$dir/admin/admin.sock"

[https]
listen = "127.0.0.1:$https_port"
issuer = "$issuer"

[[entries]]
spiffe_id = "spiffe://example.org/demo/notes-server"
selectors = ["unix:uid:$uid", "unix:path:$bin/notes-server"]

[[entries]]
spiffe_id = "spiffe://example.org/demo/notes-agent"
selectors = ["unix:uid:$uid", "unix:path:$bin/notes-agent"]

# The SDK agents run on the Python interpreter and on node.
[[entries]]
spiffe_id = "spiffe://example.org/demo/notes-agent"
selectors = ["unix:uid:$uid", "unix:path:$(readlink -f "$python")"]

[[entries]]
spiffe_id = "spiffe://example.org/demo/notes-agent"
selectors = ["unix:uid:$uid", "unix:path:$(readlink -f "$(command -v node)")"]

# The CLI fetches the trust bundle that the HTTPS face's certificate chains to.
[[entries]]
spiffe_id = "spiffe://example.org/demo/operator"
selectors = ["unix:uid:$uid", "unix:path:$bin/tessera"]

[exchange]
socket_path = "$dir/sock/exchange.sock"
policy_dir  = "$root/examples/mcp/policies"
audit_log   = "$dir/data/audit.jsonl"
max_ttl     = "5m"
approval_poll_interval = "1s"
TOML

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; for f in "$dir"/*.log; do echo "--- $f" >&2; tail -n 20 "$f" >&2; done; exit 1; }

"$bin/tessera" run --config "$dir/agent.toml" 2>"$dir/agent.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$dir/sock/exchange.sock" ] && [ -S "$dir/admin/admin.sock" ] && break; sleep 0.1; done
[ -S "$dir/sock/exchange.sock" ] || fail "the agent did not open its exchange socket"
export SPIFFE_ENDPOINT_SOCKET="unix://$dir/sock/agent.sock"
"$bin/tessera" api fetch x509 --write "$dir/certs" >/dev/null || fail "could not fetch the trust bundle"

port=$(free_port)
"$bin/notes-server" --listen "127.0.0.1:$port" --exchange-socket "$dir/sock/exchange.sock" \
  --introspection-cache 1s >"$dir/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q '^listening on' "$dir/server.log" 2>/dev/null && break; sleep 0.1; done
grep '^listening on' "$dir/server.log" || fail "the notes server did not start"

agent() { timeout 60 "$bin/notes-agent" --server "http://127.0.0.1:$port/mcp" "$@"; }

echo
echo "--- task write-1 asks for notes:read notes:write; its calls succeed"
agent --task write-1 --scopes "notes:read notes:write" \
  "add_note:buy milk" "add_note:call the plumber" list_notes \
  || fail "permitted calls did not succeed"

echo
echo "--- task read-1 asks only for notes:read: add_note gets 403; after the task ends, 401"
agent --task read-1 --scopes "notes:read" \
  list_notes "add_note:sneaky@403" end-task wait:1.5s "list_notes@401" \
  || fail "scope or revocation was not enforced"

echo
echo "--- task admin-1 asks for a scope no policy grants: the exchange refuses"
agent --task admin-1 --scopes "notes:admin" --expect-exchange access_denied \
  || fail "an ungranted scope was issued"

echo
echo "--- task cleanup-1 asks for notes:delete: policy wants an operator's approval"
agent --task cleanup-1 --scopes "notes:delete" --approval-timeout 30 \
  "delete_note:1" list_notes@403 >"$dir/cleanup.out" 2>&1 &
cleanup_pid=$!
pids+=("$cleanup_pid")
for _ in $(seq 100); do grep -q 'approval_id=' "$dir/cleanup.out" 2>/dev/null && break; sleep 0.1; done
approval=$(sed -n 's/.*approval_id=\([^ ]*\).*/\1/p' "$dir/cleanup.out" | head -n1)
[ -n "$approval" ] || { cat "$dir/cleanup.out"; fail "the delete did not wait for approval"; }
cat "$dir/cleanup.out"
echo "\$ tessera approvals list"
"$bin/tessera" approvals list --admin-socket "$dir/admin/admin.sock"
echo "\$ tessera approvals approve $approval"
"$bin/tessera" approvals approve "$approval" --admin-socket "$dir/admin/admin.sock" >/dev/null \
  || fail "approving $approval failed"
wait "$cleanup_pid" || { cat "$dir/cleanup.out"; fail "the approved delete did not succeed"; }
sed -n '/approval_id=/,$p' "$dir/cleanup.out" | tail -n +2   # the lines after those shown above

echo
echo "--- an unmodified MCP client (the official Python SDK's PrivateKeyJWTOAuthProvider)"
echo "    finds Tessera from the server's Protected Resource Metadata, gets a notes:read token"
echo "    over HTTPS, and steps up to notes:write on the 403 add_note gets"
prm=$(curl -sf "http://127.0.0.1:$port/.well-known/oauth-protected-resource/mcp") || fail "no PRM"
echo "PRM: $prm"
[ "$(echo "$prm" | python3 -c 'import json,sys; print(json.load(sys.stdin)["authorization_servers"])')" = "['$issuer']" ] \
  || fail "the PRM does not name the https issuer $issuer"
timeout 60 "$python" examples/mcp/python/mcp_sdk_client.py --server "http://127.0.0.1:$port/mcp" \
  --resource https://notes.example/mcp --issuer "$issuer" --ca "$dir/certs/bundle.0.pem" \
  --client-id spiffe://example.org/demo/notes-agent list_notes "add_note:from the MCP SDK" \
  || fail "the MCP SDK client did not get a token the server accepts"

echo
echo "=== the same with the SDKs: a Python MCP server (official MCP Python SDK + tessera_sdk)"
pyport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$python" examples/mcp/python/notes_server.py --port "$pyport" --issuer-url "$issuer" --introspection-cache 1 >"$dir/py-server.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q '^listening on' "$dir/py-server.log" 2>/dev/null && break; sleep 0.1; done
grep '^listening on' "$dir/py-server.log" || fail "the Python notes server did not start"
pyurl="http://127.0.0.1:$pyport/mcp"

echo
echo "--- Python agent: task py-1 holds notes:read, may hold notes:write: add_note gets 403, steps up, succeeds"
timeout 60 "$python" examples/mcp/python/notes_agent.py --server "$pyurl" --task py-1 \
  --scopes "notes:read" --may-hold "notes:read notes:write" "add_note:from python" list_notes \
  || fail "the Python agent's calls did not go as expected"

echo
echo "--- Python agent: task py-2 may hold notes:read only: add_note is refused (403, no step-up)"
timeout 60 "$python" examples/mcp/python/notes_agent.py --server "$pyurl" --task py-2 \
  --scopes "notes:read" list_notes "add_note:sneaky@refused" \
  || fail "the Python agent was not refused"

echo
echo "--- TypeScript agent: task ts-1, the same step-up through its fetch"
timeout 60 node examples/mcp/typescript/dist/notes-agent.js --server "$pyurl" --task ts-1 \
  --scopes "notes:read" --may-hold "notes:read notes:write" "add_note:from typescript" list_notes \
  || fail "the TypeScript agent's calls did not go as expected"

echo
echo "--- LangGraph agent (a scripted tool plan, no model): list, add (step-up), list"
timeout 60 "$python" examples/mcp/python/langgraph_agent.py --server "$pyurl" --task langgraph-1 \
  || fail "the LangGraph agent did not add its note"

echo
echo "--- what the Python notes server saw"
grep -E 'tool call|insufficient scope|rejected' "$dir/py-server.log" || true

echo
echo "--- what the notes server saw (tool calls, and the guard's reasons for refusals)"
grep -E 'tool call|rejected|insufficient scope' "$dir/server.log" | sed -E 's/^[^ ]+ +//' || true

echo
echo "--- the audit log"
"$bin/tessera" audit verify "$dir/data/audit.jsonl" || fail "the audit log does not verify"
echo
echo "MCP demo passed"
