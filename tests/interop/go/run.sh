#!/usr/bin/env bash
# Runs the go-spiffe interop suite against a fresh Tessera agent, with
# token-guard's WIT example server (wit_guard_server) built for the
# Workload Proof Token tests.
#   tests/interop/go/run.sh [extra go test args]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
[ -n "${TESSERA_PREBUILT:-}" ] || (cd "$root" && cargo build --locked -q -p tessera-token-guard --example wit_guard_server)  # scripts/test.sh builds everything once
export TESSERA_WIT_GUARD_BIN=${TESSERA_WIT_GUARD_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/examples/wit_guard_server}
cd "$here"
go mod download
../agent.sh go test -count=1 -v ./... "$@"
# The JWT-SVID tests again against an agent signing RS256 (jwt_key_type =
# "rsa-2048", what Microsoft Entra needs): go-spiffe's JWT bundle and
# jwtsvid.ParseAndValidate, and ValidateJWTSVID.
TESSERA_JWT_KEY_TYPE=rsa-2048 exec ../agent.sh go test -count=1 -v -run JWT ./... "$@"
