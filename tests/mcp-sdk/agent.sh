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
source "$(dirname "$0")/../lib/agent.sh"
agent_init tessera-mcp-sdk
dir=$agent_dir
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

agent_start
"$agent_bin" api fetch x509 --write "$dir/certs" >/dev/null
export TESSERA_ISSUER="https://localhost:$https_port"
export TESSERA_CA="$dir/certs/bundle.0.pem"
export TESSERA_CLIENT_ID="$client_id"
export TESSERA_BIN="$agent_bin"
export MCP_PORT_PY="$py_port" MCP_PORT_TS="$ts_port"
agent_run "$@"
