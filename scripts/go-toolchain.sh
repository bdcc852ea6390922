# Sourced, not run: makes `go` at least $GO_TOOLCHAIN for the calling script.
#
# The interop suites' go.mod says go 1.24 and the kube-apiserver build needs
# 1.26, while a distribution's golang-go can be older (Debian's is 1.19, too
# old to switch toolchains by itself). An older Go fetches the pinned
# toolchain from the Go module proxy, where it is published as the module
# golang.org/toolchain, and PATH and GOROOT point at it; nothing else is
# fetched. GOTOOLCHAIN=local keeps any go.mod from asking for another one.
GO_TOOLCHAIN=go1.26.8
command -v go >/dev/null || { echo "a Go toolchain is required (any version; $GO_TOOLCHAIN is fetched through the Go module proxy if older)" >&2; return 2; }
go_minor=$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')
if [ "${go_minor:-0}" -lt 26 ]; then
  echo "$(go env GOVERSION) is older than Go 1.26; using $GO_TOOLCHAIN from the Go module proxy" >&2
  tc_dir=$(cd / && GOFLAGS= GO111MODULE=on go mod download -json \
    "golang.org/toolchain@v0.0.1-$GO_TOOLCHAIN.linux-$(go env GOARCH)" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -n "$tc_dir" ] && [ -f "$tc_dir/bin/go" ] || { echo "could not fetch $GO_TOOLCHAIN through the Go module proxy" >&2; return 2; }
  # The module cache keeps files read-only and without execute bits.
  chmod +x "$tc_dir/bin/go" "$tc_dir/bin/gofmt" "$tc_dir"/pkg/tool/*/* 2>/dev/null || true
  export PATH="$tc_dir/bin:$PATH" GOROOT="$tc_dir"
fi
export GOTOOLCHAIN=local
