# syntax=docker/dockerfile:1
#
# The Tessera agent image: one binary, `tessera`, on distroless.
#
#   docker build -t tessera:0.1.0 .
#   docker run --rm tessera:0.1.0 --help
#
# The Helm chart (helm/tessera) runs it as `tessera run --config ...`, and its
# helm test pod as `tessera api fetch x509`.

# ---------------------------------------------------------------- build
# Debian 12 (bookworm) on both sides: the binary links against the builder's
# glibc, so the builder must not be newer than the runtime image.
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# The whole workspace: cargo reads every member's manifest even to build one
# package, and the generated Workload API code is committed (no protoc).
COPY . .
# "Static-ish": rustls + ring, no OpenSSL, so the only shared libraries are
# glibc and libgcc_s, both in distroless/cc. (Fully static musl would work too,
# but musl's allocator is a poor fit for a multi-threaded tokio server.)
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tessera-agent \
 && install -D -m 0755 target/release/tessera /out/tessera

# ---------------------------------------------------------------- runtime
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tessera /usr/local/bin/tessera
# Non-root by default (uid 65532): right for the client commands (`tessera
# api ...`, the helm test pod) and for a dev agent with its socket in a
# directory it owns. The DaemonSet overrides this with runAsUser 0 because the
# node agent creates its socket in a root-owned hostPath directory and must
# read /proc/<pid>/exe of other users' processes (with only CAP_SYS_PTRACE
# added; every other capability is dropped). See helm/tessera/README.md.
USER 65532:65532
# The chart's admin listener (/healthz, /readyz, /metrics).
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/tessera"]
CMD ["--help"]
LABEL org.opencontainers.image.title="tessera" \
      org.opencontainers.image.description="SPIFFE workload identity agent" \
      org.opencontainers.image.licenses="Apache-2.0"
