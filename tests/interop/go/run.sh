#!/usr/bin/env bash
# Runs the go-spiffe interop suite against a fresh Tessera agent.
#   tests/interop/go/run.sh [extra go test args]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
go mod download
exec ../agent.sh go test -count=1 -v ./... "$@"
