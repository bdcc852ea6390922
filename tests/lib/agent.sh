# Shared by the scripts that run a test command against a fresh Tessera agent
# (tests/interop/agent.sh, tests/mcp-sdk/agent.sh). Source it, write
# "$agent_dir/agent.toml" (its socket_path must be "$agent_dir/sock/agent.sock"),
# then call `agent_start` and finally `agent_run COMMAND [ARGS...]`.
#
#   agent_init PREFIX   sets $agent_bin (TESSERA_BIN or target/debug/tessera)
#                       and makes $agent_dir, a fresh /tmp/PREFIX.XXXXXX that
#                       is deleted on exit
#   agent_start         starts the agent on "$agent_dir/agent.toml", waits for
#                       its socket (10 s) and exports SPIFFE_ENDPOINT_SOCKET;
#                       stops it (SIGTERM) on exit
#   agent_run CMD...    runs the command, prints the agent's log if it failed,
#                       and exits with the command's status

agent_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

agent_init() {
  agent_bin=${TESSERA_BIN:-$agent_root/target/debug/tessera}
  [ -x "$agent_bin" ] || { echo "$0: $agent_bin not built (cargo build -p tessera-agent)" >&2; exit 2; }
  agent_dir=$(mktemp -d "/tmp/$1.XXXXXX")
  agent_pid=""
  trap agent_cleanup EXIT
}

agent_cleanup() {
  if [ -n "$agent_pid" ]; then
    kill -TERM "$agent_pid" 2>/dev/null || true
    wait "$agent_pid" 2>/dev/null || true
  fi
  rm -rf "$agent_dir"
}

agent_start() {
  local socket="$agent_dir/sock/agent.sock"
  "$agent_bin" run --config "$agent_dir/agent.toml" >"$agent_dir/agent.log" 2>&1 &
  agent_pid=$!
  for _ in $(seq 1 100); do
    [ -S "$socket" ] && break
    kill -0 "$agent_pid" 2>/dev/null || { cat "$agent_dir/agent.log" >&2; exit 1; }
    sleep 0.1
  done
  [ -S "$socket" ] || { echo "$0: the agent did not start" >&2; cat "$agent_dir/agent.log" >&2; exit 1; }
  export SPIFFE_ENDPOINT_SOCKET="unix://$socket"
}

agent_run() {
  local status
  set +e
  "$@"
  status=$?
  set -e
  if [ $status -ne 0 ]; then
    echo "---- agent log ----" >&2
    cat "$agent_dir/agent.log" >&2
  fi
  exit $status
}
