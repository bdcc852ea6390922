#!/usr/bin/env bash
# Builds spire-server and spire-agent from a SPIRE checkout the caller provides,
# for the side-by-side figures in BENCHMARKS.md ("Tessera and SPIRE side by
# side"). Nothing of SPIRE is kept in this repository: the checkout is edited
# in place (one plugin removed, see below) and the binaries land in OUT.
#
#   git clone https://github.com/spiffe/spire /tmp/spire
#   git -C /tmp/spire checkout ef8527ec9
#   scripts/build-spire.sh /tmp/spire /tmp/spire-bin
#
# The EJBCA UpstreamAuthority plugin is removed from the build: its module,
# github.com/Keyfactor/ejbca-go-client-sdk, is not served by the Go module
# proxy this machine can reach, and the benchmark uses SPIRE's own disk CA.
set -euo pipefail
src=${1:?usage: build-spire.sh SPIRE_CHECKOUT [OUT_DIR]}
out=${2:-$src/bin}
cd "$src"
catalog=pkg/server/catalog/upstreamauthority.go
if [ -d pkg/server/plugin/upstreamauthority/ejbca ]; then
  rm -rf pkg/server/plugin/upstreamauthority/ejbca
  sed -i '/upstreamauthority\/ejbca"/d; /ejbca\.BuiltIn()/d' "$catalog"
  go mod edit -droprequire=github.com/Keyfactor/ejbca-go-client-sdk
fi
if grep -q ejbca "$catalog"; then
  echo "build-spire.sh: $catalog still names the ejbca plugin; edit it by hand" >&2
  exit 1
fi
mkdir -p "$out"
# -mod=mod: dropping the plugin changes the module graph (its indirect
# requirements go), so let the go command settle go.mod/go.sum.
GOFLAGS="${GOFLAGS:-} -mod=mod" go build -trimpath -o "$out/" ./cmd/spire-server ./cmd/spire-agent
"$out/spire-agent" --version 2>&1 || true
echo "built: $out/spire-server $out/spire-agent (commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
