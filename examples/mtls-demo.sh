#!/usr/bin/env bash
# mTLS between two workloads, each identified by the agent from its
# executable path (unix:path selector), with SVIDs served over the Workload API.
#
#   examples/mtls-demo.sh          # builds what it needs, prints the exchange
#
# Exit status 0 only if the client and server authenticated each other and a
# client whose SPIFFE ID the server does not accept was refused.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ -n "${TESSERA_PREBUILT:-}" ] || cargo build -q --locked -p tessera-agent -p tessera-examples  # scripts/test.sh builds everything once
# The real path: unix:path selectors match the executable the kernel reports,
# and target/ may be a link (CI keeps the build directory in a cache).
bin=$(cd "$root/target/debug" && pwd -P)
dir=$(mktemp -d /tmp/tessera-mtls.XXXXXX)
uid=$(id -u)
cat > "$dir/agent.toml" <<TOML
trust_domain = "example.org"
socket_path  = "$dir/sock/agent.sock"
data_dir     = "$dir/data"

[[entries]]
spiffe_id = "spiffe://example.org/demo/server"
selectors = ["unix:uid:$uid", "unix:path:$bin/mtls-server"]

[[entries]]
spiffe_id = "spiffe://example.org/demo/client"
selectors = ["unix:uid:$uid", "unix:path:$bin/mtls-client"]

# The same client program installed elsewhere is a different workload.
[[entries]]
spiffe_id = "spiffe://example.org/demo/other"
selectors = ["unix:uid:$uid", "unix:path:$dir/other-client"]
TOML

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
"$bin/tessera" run --config "$dir/agent.toml" 2>"$dir/agent.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$dir/sock/agent.sock" ] && break; sleep 0.1; done
export SPIFFE_ENDPOINT_SOCKET="unix://$dir/sock/agent.sock"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin/mtls-server" --listen "127.0.0.1:$port" --allow spiffe://example.org/demo/client >"$dir/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$dir/server.log" 2>/dev/null && break; sleep 0.1; done
cat "$dir/server.log"

echo "--- client with the accepted identity"
out=$(timeout 30 "$bin/mtls-client" --connect "127.0.0.1:$port" --expect spiffe://example.org/demo/server)
echo "$out"
grep -q 'hello spiffe://example.org/demo/client' <<<"$out"

echo "--- the same program from another path is another identity, and the server refuses it"
cp "$bin/mtls-client" "$dir/other-client"
if RUST_BACKTRACE=0 timeout 30 "$dir/other-client" --connect "127.0.0.1:$port" --expect spiffe://example.org/demo/server >"$dir/other.log" 2>&1; then
  echo "FAIL: spiffe://example.org/demo/other was let in" >&2; cat "$dir/other.log" >&2; exit 1
fi
cat "$dir/other.log"
grep -q "rejected" "$dir/server.log" || { echo "FAIL: the server did not reject the other identity" >&2; exit 1; }
grep "rejected" "$dir/server.log"
echo "mTLS demo passed"
