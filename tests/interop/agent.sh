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
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${TESSERA_BIN:-$root/target/debug/tessera}
[ -x "$bin" ] || { echo "agent.sh: $bin not built (cargo build -p tessera-agent)" >&2; exit 2; }

jwt_key_type=${TESSERA_JWT_KEY_TYPE:-ec-p256}
dir=$(mktemp -d /tmp/tessera-interop.XXXXXX)
uid=$(id -u)
cat > "$dir/agent.toml" <<TOML
trust_domain = "example.org"
socket_path  = "$dir/sock/agent.sock"
data_dir     = "$dir/data"

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
export TESSERA_EXPECTED_ID="spiffe://example.org/interop/uid-$uid"
export TESSERA_TRUST_DOMAIN="example.org"
export TESSERA_JWT_KEY_TYPE="$jwt_key_type"
set +e
"$@"
status=$?
set -e
if [ $status -ne 0 ]; then
  echo "---- agent log ----" >&2
  cat "$dir/agent.log" >&2
fi
exit $status
