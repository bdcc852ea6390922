#!/usr/bin/env bash
# Runs a command against a freshly started Tessera agent.
#
#   tests/interop/agent.sh COMMAND [ARGS...]
#
# Starts `$TESSERA_BIN` (default: target/debug/tessera) with a config that
# gives the calling uid the ID spiffe://example.org/interop/uid-<uid> and a
# 6-second X509-SVID and WIT-SVID TTL (so one rotation of each happens
# within ~3 s), exports
# SPIFFE_ENDPOINT_SOCKET, TESSERA_EXPECTED_ID and TESSERA_TRUST_DOMAIN for
# the command, runs it, stops the agent (SIGTERM) and exits with the
# command's status. TESSERA_JWT_KEY_TYPE (default ec-p256) is the agent's
# authority.jwt_key_type, exported too. The agent's log is printed if the command fails.
set -euo pipefail
source "$(dirname "$0")/../lib/agent.sh"
agent_init tessera-interop

jwt_key_type=${TESSERA_JWT_KEY_TYPE:-ec-p256}
uid=$(id -u)
cat > "$agent_dir/agent.toml" <<TOML
trust_domain = "example.org"
socket_path  = "$agent_dir/sock/agent.sock"
data_dir     = "$agent_dir/data"

[svid]
x509_ttl = "6s"
jwt_ttl  = "2m"
wit_ttl  = "6s"

[authority]
jwt_key_type = "$jwt_key_type"

# The HTTPS face on a free port: JWT-SVIDs carry its URL as iss.
[https]
listen = "127.0.0.1:0"

[[entries]]
spiffe_id = "spiffe://example.org/interop/uid-{unix:uid}"
selectors = ["unix:uid:$uid"]
hint      = "interop"
TOML

agent_start
export TESSERA_EXPECTED_ID="spiffe://example.org/interop/uid-$uid"
export TESSERA_TRUST_DOMAIN="example.org"
export TESSERA_JWT_KEY_TYPE="$jwt_key_type"
agent_run "$@"
