#!/usr/bin/env bash
# Tessera and SPIRE's agent side by side: the same `tessera bench --socket
# --agent-pid` commands against each, alternated (SPIRE, Tessera, SPIRE, ...)
# scenario by scenario, ROUNDS times. One JSON object per line on stdout,
# each with "agent" and "round" added; BENCHMARKS.md ("Tessera and SPIRE side
# by side") has the table made from them.
#
#   scripts/build-spire.sh /tmp/spire /tmp/spire-bin
#   cargo build --release --locked -p tessera-agent
#   sudo scripts/bench-side-by-side.sh /tmp/spire-bin target/release/tessera 3 > side.jsonl
#
# PHASES picks the phases to run (default: all, "idle-memory calls fanout
# new-entry"; "calls" is x509-first, jwt-fetch and jwt-validate), e.g. to
# re-measure the per-call rows alone after a change to the request path.
#
# With a fourth argument, an older Tessera binary runs as a third agent
# ("tessera-base") in the same rotation (SPIRE, old, new, SPIRE, ...), so a
# change is measured before and after in the same run as SPIRE. The bench
# client is always the new binary.
#
# Run as root (like the rest of the suite): the fanout phase runs the bench as
# uid 65534, so that its streams hold one identity with a short X509-SVID TTL
# while the other phases keep a 1 h one.
#
# Both agents get the same setup:
# - one identity for uid 0 (`spiffe://example.org/bench`, X509-SVID 1 h) and
#   one for uid 65534 (`spiffe://example.org/bench-fanout`, X509-SVID 30 s, so
#   a renewal is pushed to the fanout streams within the rotation timeout);
# - the Unix workload attestor without executable path discovery
#   (`discover_workload_path = false` on both), so neither hashes binaries;
# - no rate limit (SPIRE's agent has none on the Workload API);
# - each phase starts a fresh agent process (SPIRE's server stays up: it is not
#   measured; its agent keeps its node SVID in its data directory across
#   restarts, as in production).
# New entries (`new-entry`) are registered the way each agent takes them:
# `spire-server entry create`, or appending to Tessera's config and SIGHUP.
set -euo pipefail

spire_bin=${1:?usage: bench-side-by-side.sh SPIRE_BIN_DIR [TESSERA_BIN] [ROUNDS]}
tessera=$(realpath "${2:-target/release/tessera}")
rounds=${3:-3}
base=${4:+$(realpath "$4")}
spire_bin=$(realpath "$spire_bin")
phases=" ${PHASES:-idle-memory calls fanout new-entry} "
phase() { [[ $phases == *" $1 "* ]]; }
agents=(spire ${base:+tessera-base} tessera)
# Streams held open by idle-memory and fanout, opened 32 at a time (the
# bench's --opening): with a few hundred first messages outstanding, SPIRE's
# agent deadlocks the in-process connection to its workload attestor plugin
# (BENCHMARKS.md, "Tessera and SPIRE side by side"). SPIRE_STREAMS=0 still
# leaves SPIRE out of those two phases.
streams=${STREAMS:-10000}
spire_streams=${SPIRE_STREAMS:-1}
stream_agents=("${agents[@]}")
[ "$spire_streams" = 0 ] && stream_agents=("${agents[@]:1}")
[ "$(id -u)" = 0 ] || { echo "bench-side-by-side.sh: run as root" >&2; exit 1; }
command -v setpriv >/dev/null || { echo "bench-side-by-side.sh: needs setpriv (util-linux)" >&2; exit 1; }
ulimit -n 20000

work=$(mktemp -d /tmp/side-by-side.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
log() { echo "[$(date +%T)] $*" >&2; }

# --- SPIRE -------------------------------------------------------------------
port=$((20000 + RANDOM % 20000))
mkdir -p "$work/spire/server-data" "$work/spire/agent-data"
chmod 755 "$work/spire"
cat > "$work/spire/server.conf" <<EOF
server {
  bind_address = "127.0.0.1"
  bind_port = "$port"
  socket_path = "$work/spire/server.sock"
  trust_domain = "example.org"
  data_dir = "$work/spire/server-data"
  log_level = "WARN"
  default_x509_svid_ttl = "1h"
}
plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = "$work/spire/server-data/datastore.sqlite3"
    }
  }
  NodeAttestor "join_token" { plugin_data {} }
  KeyManager "memory" { plugin_data {} }
}
EOF
cat > "$work/spire/agent.conf" <<EOF
agent {
  data_dir = "$work/spire/agent-data"
  log_level = "WARN"
  server_address = "127.0.0.1"
  server_port = "$port"
  socket_path = "$work/spire/agent.sock"
  trust_bundle_path = "$work/spire/bundle.pem"
  trust_domain = "example.org"
}
plugins {
  NodeAttestor "join_token" { plugin_data {} }
  KeyManager "disk" { plugin_data { directory = "$work/spire/agent-data" } }
  WorkloadAttestor "unix" { plugin_data { discover_workload_path = false } }
}
EOF
server() { "$spire_bin/spire-server" "$@" -socketPath "$work/spire/server.sock"; }

"$spire_bin/spire-server" run -config "$work/spire/server.conf" 2>"$work/spire/server.log" &
pids+=($!)
for _ in $(seq 100); do server healthcheck >/dev/null 2>&1 && break; sleep 0.2; done
server healthcheck >/dev/null
server bundle show > "$work/spire/bundle.pem"
token=$(server token generate -spiffeID spiffe://example.org/node | awk '/Token:/ {print $2}')
server entry create -parentID spiffe://example.org/node -spiffeID spiffe://example.org/bench \
  -selector unix:uid:0 -x509SVIDTTL 3600 >/dev/null
server entry create -parentID spiffe://example.org/node -spiffeID spiffe://example.org/bench-fanout \
  -selector unix:uid:65534 -x509SVIDTTL 30 >/dev/null
spire_join=(-joinToken "$token")

# --- Tessera -----------------------------------------------------------------
mkdir -p "$work/tessera"
chmod 755 "$work/tessera"
cat > "$work/tessera/agent.toml.orig" <<EOF
trust_domain = "example.org"
socket_path = "$work/tessera/agent.sock"
data_dir = "$work/tessera/data"
[authority]
persist = false
[svid]
x509_ttl = "1h"
[attestor.unix]
discover_workload_path = false
[log]
level = "warn"
[limits]
requests_per_second = 1e12
request_burst = 1e12
[[entries]]
spiffe_id = "spiffe://example.org/bench"
selectors = ["unix:uid:0"]
[[entries]]
spiffe_id = "spiffe://example.org/bench-fanout"
selectors = ["unix:uid:65534"]
x509_ttl = "30s"
EOF

# --- one fresh agent at a time -----------------------------------------------
agent_pid=
socket=
start() {
  case $1 in
    spire)
      socket=$work/spire/agent.sock
      rm -f "$socket"
      "$spire_bin/spire-agent" run -config "$work/spire/agent.conf" "${spire_join[@]}" \
        >>"$work/spire/agent.log" 2>&1 &
      agent_pid=$!
      spire_join=() # the node SVID is kept in the data directory from now on
      for _ in $(seq 150); do
        "$spire_bin/spire-agent" healthcheck -socketPath "$socket" >/dev/null 2>&1 && break
        sleep 0.2
      done
      "$spire_bin/spire-agent" healthcheck -socketPath "$socket" >/dev/null
      # Healthy is not yet serving: the entries arrive with the first sync.
      for _ in $(seq 150); do
        "$spire_bin/spire-agent" api fetch x509 -socketPath "$socket" >/dev/null 2>&1 && break
        sleep 0.2
      done
      ;;
    tessera | tessera-base)
      socket=$work/tessera/agent.sock
      cp "$work/tessera/agent.toml.orig" "$work/tessera/agent.toml"
      local binary=$tessera
      [ "$1" = tessera-base ] && binary=$base
      "$binary" run --config "$work/tessera/agent.toml" 2>>"$work/tessera/agent.log" &
      agent_pid=$!
      for _ in $(seq 150); do
        "$tessera" healthcheck --socket "$socket" >/dev/null 2>&1 && break
        sleep 0.2
      done
      "$tessera" healthcheck --socket "$socket" >/dev/null
      ;;
  esac
  pids+=("$agent_pid")
  # Let start-up work (first sync, first issuance) settle before measuring.
  sleep 2
}
stop() {
  kill "$agent_pid"
  wait "$agent_pid" 2>/dev/null || true
}
register_command() {
  case $1 in
    spire)
      echo "$spire_bin/spire-server entry create -socketPath $work/spire/server.sock -parentID spiffe://example.org/node -spiffeID \"\$TESSERA_BENCH_NEW_ID\" -selector unix:uid:0"
      ;;
    tessera | tessera-base)
      echo "printf '[[entries]]\\nspiffe_id = \"%s\"\\nselectors = [\"unix:uid:0\"]\\n' \"\$TESSERA_BENCH_NEW_ID\" >> $work/tessera/agent.toml && kill -HUP $agent_pid"
      ;;
  esac
}
forget_new_entries() {
  # SPIRE keeps registered entries; remove them so later rounds serve one identity.
  server entry show -output json | python3 -c '
import json, sys
for e in json.load(sys.stdin).get("entries") or []:
    if e["spiffe_id"]["path"].startswith("/bench/new-"):
        print(e["id"])' | while read -r id; do server entry delete -entryID "$id" >/dev/null; done
}
bench() { # AGENT ROUND [setpriv args --] bench args...
  local name=$1 round=$2
  shift 2
  local as=()
  if [ "$1" = nobody ]; then as=(setpriv --reuid=65534 --regid=65534 --clear-groups); shift; fi
  "${as[@]}" "$tessera" bench --json --socket "$socket" --agent-pid "$agent_pid" "$@" \
    | sed "s/^{/{\"agent\":\"$name\",\"round\":$round,/"
}

for round in $(seq "$rounds"); do
  if phase idle-memory; then
    for agent in "${stream_agents[@]}"; do
      log "round $round: $agent idle-memory"
      start "$agent"
      bench "$agent" "$round" idle-memory --streams "$streams"
      stop
    done
  fi
  if phase calls; then
    for agent in "${agents[@]}"; do
      log "round $round: $agent x509-first, jwt-fetch, jwt-validate"
      start "$agent"
      bench "$agent" "$round" x509-first --clients 1 --duration 5s
      bench "$agent" "$round" x509-first --clients 100 --duration 5s
      bench "$agent" "$round" jwt-fetch --clients 100 --duration 5s
      bench "$agent" "$round" jwt-validate --clients 1 --duration 5s
      stop
    done
  fi
  if phase fanout; then
    for agent in "${stream_agents[@]}"; do
      log "round $round: $agent fanout"
      start "$agent"
      bench "$agent" "$round" nobody fanout --streams "$streams" --rotation-timeout 60s
      stop
    done
  fi
  if phase new-entry; then
    for agent in "${agents[@]}"; do
      log "round $round: $agent new-entry"
      start "$agent"
      bench "$agent" "$round" new-entry --rounds 3 --rotation-timeout 60s \
        --register-command "$(register_command "$agent")"
      stop
      if [ "$agent" = spire ]; then forget_new_entries; fi
    done
  fi
done
