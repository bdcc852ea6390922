#!/usr/bin/env bash
# Runs a command against a fresh Tessera agent with its HTTPS face and token
# service on, for the MCP SDK conformance tests.
#
#   tests/mcp-sdk/agent.sh COMMAND [ARGS...]
#
# Starts `$TESSERA_BIN` (default: target/debug/tessera) with the HTTPS face
# on a free localhost port and a policy that lets the calling uid's identity
# (spiffe://example.org/mcp-client/uid-<uid>) get `notes:read` bearer tokens
# for two MCP servers on loopback, one per SDK. Exports for the command:
#   SPIFFE_ENDPOINT_SOCKET  the Workload API socket
#   TESSERA_ISSUER          the https issuer URL
#   TESSERA_CA              the trust domain's CA bundle (PEM) to trust it
#   TESSERA_CLIENT_ID       the caller's SPIFFE ID
#   TESSERA_BIN             the tessera binary
#   MCP_PORT_PY, MCP_PORT_TS  the ports the MCP servers listen on
# then stops the agent (SIGTERM) and exits with the command's status,
# printing the agent's log if it failed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${TESSERA_BIN:-$root/target/debug/tessera}
[ -x "$bin" ] || { echo "agent.sh: $bin not built (cargo build -p tessera-agent)" >&2; exit 2; }

dir=$(mktemp -d /tmp/tessera-mcp-sdk.XXXXXX)
uid=$(id -u)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
https_port=$(free_port)
py_port=$(free_port)
ts_port=$(free_port)
client_id="spiffe://example.org/mcp-client/uid-$uid"
mkdir -p "$dir/policies"
for port in "$py_port" "$ts_port"; do
  cat >> "$dir/policies/mcp.cedar" <<CEDAR
// Over HTTPS nothing is attested: the JWT-SVID names the principal, and
// without a client certificate the token is a bearer token.
@id("mcp-sdk-read-$port")
@bearer
@max_ttl("300s")
permit(principal == Tessera::Workload::"$client_id",
       action == Tessera::Action::"notes:read",
       resource == Tessera::Audience::"http://127.0.0.1:$port/mcp");
CEDAR
done
cat > "$dir/agent.toml" <<TOML
trust_domain = "example.org"
socket_path  = "$dir/sock/agent.sock"
data_dir     = "$dir/data"

[https]
listen = "127.0.0.1:$https_port"
issuer = "https://localhost:$https_port"

[exchange]
policy_dir = "$dir/policies"

[[entries]]
spiffe_id = "$client_id"
selectors = ["unix:uid:$uid"]
TOML

"$bin" run --config "$dir/agent.toml" >"$dir/agent.log" 2>&1 &
agent=$!
cleanup() {
  kill -TERM "$agent" 2>/dev/null || true
  wait "$agent" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  [ -S "$dir/sock/agent.sock" ] && break
  kill -0 "$agent" 2>/dev/null || { cat "$dir/agent.log" >&2; exit 1; }
  sleep 0.1
done
[ -S "$dir/sock/agent.sock" ] || { echo "agent did not start" >&2; cat "$dir/agent.log" >&2; exit 1; }

export SPIFFE_ENDPOINT_SOCKET="unix://$dir/sock/agent.sock"
"$bin" api fetch x509 --write "$dir/certs" >/dev/null
export TESSERA_ISSUER="https://localhost:$https_port"
export TESSERA_CA="$dir/certs/bundle.0.pem"
export TESSERA_CLIENT_ID="$client_id"
export TESSERA_BIN="$bin"
export MCP_PORT_PY="$py_port" MCP_PORT_TS="$ts_port"
set +e
"$@"
status=$?
set -e
if [ $status -ne 0 ]; then
  echo "---- agent log ----" >&2
  cat "$dir/agent.log" >&2
fi
exit $status
