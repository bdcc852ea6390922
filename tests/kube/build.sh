#!/usr/bin/env bash
# Builds the genuine Kubernetes API server, kubectl and etcd from the Go
# module proxy, once per version, into ~/.cache/tessera/kube-<version>/bin.
# The tests in tests/tests/kube_*.rs and tests/tests/fleet*.rs run against
# them (TESSERA_KUBE_BIN points there). A second run finds the binaries and
# returns at once; a fresh machine pays about 6 minutes on 2 cores.
#
# Why from source: no Kubernetes binaries are reachable from here except
# through the Go module proxy. k8s.io/kubernetes cannot be `go install`ed
# (its go.mod replaces the staging modules with local paths), so a scratch
# module requires it and pins every staging module to the matching v0.x.
set -euo pipefail

KUBE_VERSION=1.37.2
ETCD_VERSION=3.7.4
STAGING_VERSION=0.37.2
out="${TESSERA_KUBE_CACHE:-$HOME/.cache/tessera/kube-$KUBE_VERSION}"
bin="$out/bin"

want=(kube-apiserver kubectl etcd)
built() {
  for b in "${want[@]}"; do [ -x "$bin/$b" ] || return 1; done
  [ -f "$out/versions" ] && grep -qx "kube=$KUBE_VERSION etcd=$ETCD_VERSION" "$out/versions"
}
if built; then
  echo "$bin"
  exit 0
fi
# One build at a time per machine (several checkouts share the cache).
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
if built; then
  echo "$bin"
  exit 0
fi

# kube-apiserver v1.37 and etcd v3.7 declare `go 1.26.0`.
source "$(dirname "$0")/../../scripts/go-toolchain.sh"
export GOFLAGS=-buildvcs=false GOTOOLCHAIN=local CGO_ENABLED=0
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$bin"

# --- Kubernetes: kube-apiserver and kubectl -------------------------------
mkdir -p "$work/kube"
cd "$work/kube"
staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
  cloud-provider cluster-bootstrap code-generator component-base component-helpers
  controller-manager cri-api cri-client cri-streaming csi-translation-lib
  dynamic-resource-allocation endpointslice externaljwt kms kube-aggregator
  kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
  mount-utils pod-security-admission sample-apiserver streaming)
{
  echo "module tessera.test/kubebuild"
  echo
  echo "go 1.25"
  echo
  echo "require k8s.io/kubernetes v$KUBE_VERSION"
  echo
  for m in "${staging[@]}"; do
    echo "replace k8s.io/$m => k8s.io/$m v$STAGING_VERSION"
  done
} > go.mod
cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
go mod tidy >&2
v=k8s.io/component-base/version
ldflags="-s -w -X $v.gitVersion=v$KUBE_VERSION -X $v.gitMajor=${KUBE_VERSION%%.*} \
 -X $v.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2) -X $v.gitTreeState=clean \
 -X $v.buildDate=1970-01-01T00:00:00Z"
# One package at a time: each link peaks near 2.7 GB.
for cmd in kube-apiserver kubectl; do
  echo "building $cmd v$KUBE_VERSION" >&2
  go build -trimpath -ldflags "$ldflags" -o "$bin/$cmd" "k8s.io/kubernetes/cmd/$cmd" >&2
done

# --- etcd -----------------------------------------------------------------
mkdir -p "$work/etcd"
cd "$work/etcd"
cat > go.mod <<GOMOD
module tessera.test/etcdbuild

go 1.25

require go.etcd.io/etcd/server/v3 v$ETCD_VERSION
GOMOD
cat > main.go <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
go mod tidy >&2
echo "building etcd v$ETCD_VERSION" >&2
go build -trimpath -ldflags "-s -w" -o "$bin/etcd" . >&2

echo "kube=$KUBE_VERSION etcd=$ETCD_VERSION" > "$out/versions"
echo "$bin"
