#!/usr/bin/env bash
# Supply-chain checks for the Tessera workspace, driven by deny.toml.
#
#   bash scripts/supply-chain.sh
#
# 1. cargo-deny (pinned, installed with `cargo install --locked` if missing):
#    licenses, bans (one crypto backend: ring) and sources (crates.io only)
#    over the whole workspace graph, Cargo.lock used as is (--locked).
# 2. The shipped crates' normal dependency graph contains ring and no other
#    crypto backend (deny.toml allows the RustCrypto crates only under the
#    test-only jsonwebtoken; this proves they stay out of what we ship).
# 3. The same cargo-deny checks for the fuzz harness (fuzz/, its own
#    workspace and Cargo.lock), if present.
# 4. RustSec advisories, only when a copy of the advisory database can be had:
#      TESSERA_ADVISORY_DB=/path/to/advisory-db   a git checkout of
#                                                 rustsec/advisory-db; used
#                                                 with --offline (no fetch)
#      TESSERA_ADVISORIES=online                  fetch it (needs GitHub)
#    The database lives on GitHub and no package registry this project can
#    reach carries a copy, so by default advisories are NOT checked and the
#    script says so on stderr. TESSERA_REQUIRE_ADVISORIES=1 turns that into a
#    failure. TESSERA_CARGO_AUDIT=1 also runs the pinned cargo-audit against
#    the same database (the ignore list is read from deny.toml).
#
# Exit status: non-zero if any check that ran failed. The last line is
# "supply-chain: N passed, N failed[, N skipped]".

set -euo pipefail
cd "$(dirname "$0")/.."

# Both build with the stable toolchain used here (1.95; MSRV 1.88 for both).
CARGO_DENY_VERSION=0.20.2
CARGO_AUDIT_VERSION=0.22.2
# The crates we ship: the daemon (and its two libraries) and the resource
# server library. Tests, examples, benches and fuzz are not shipped.
SHIPPED=(tessera-agent tessera-attestor tessera-workload-api tessera-token-guard)
# Crypto implementations other than ring that must not be in their graph.
# `rsa` is allowed: tessera-agent generates RSA JWT-SVID keys with it (ring
# cannot) and signs with ring; deny.toml's `wrappers` lets no other crate
# depend on it.
FORBIDDEN_CRYPTO='^(openssl|openssl-sys|native-tls|aws-lc-rs|aws-lc-sys|aws-lc-fips-sys|boring|boring-sys|p256|p384|p521|ecdsa|ed25519-dalek|jsonwebtoken)$'
# cargo-deny derives the checkout's directory name from the default URL
# https://github.com/rustsec/advisory-db (deny.toml `db-urls`).
ADVISORY_DB_DIRNAME=advisory-db-3157b0e258782691

started=$(date +%s)
passed=0
failed=0
skipped=0
failures=()

step() { printf '\n== %s\n' "$*"; }
pass() { passed=$((passed + 1)); printf 'ok: %s\n' "$1"; }
fail() { failed=$((failed + 1)); failures+=("$1"); printf 'FAILED: %s\n' "$1" >&2; }

# install_tool BINARY CRATE VERSION: cargo install --locked, unless that
# exact version is already on PATH. Built in a throwaway target directory so
# the workspace's target/ is not touched.
install_tool() {
    local bin=$1 crate=$2 version=$3 have=""
    if command -v "$bin" >/dev/null 2>&1; then
        have=$("$bin" --version 2>/dev/null | awk '{print $2}' || true)
    fi
    if [[ "$have" == "$version" ]]; then
        return 0
    fi
    echo "installing $crate $version (have: ${have:-none}); this takes a few minutes once"
    local t0=$SECONDS
    env -u CARGO_TARGET_DIR cargo install --locked --quiet "$crate" --version "=$version"
    echo "installed $crate $version in $((SECONDS - t0))s"
}

# The advisory ids ignored in deny.toml, so cargo-audit ignores the same set.
ignored_advisories() {
    grep -oE '\{ *id *= *"RUSTSEC-[0-9]{4}-[0-9]{4}"' deny.toml | grep -oE 'RUSTSEC-[0-9]{4}-[0-9]{4}'
}

step "tools"
install_tool cargo-deny cargo-deny "$CARGO_DENY_VERSION"
cargo deny --version

step "cargo deny: licenses, bans, sources (workspace, --locked)"
# license-exception-not-encountered: the NCSA exception is for fuzz/ only.
# duplicate: several versions of one crate are a size issue, not a security
# one, and their inclusion graphs run to hundreds of lines; see them with
# `cargo deny check bans`. Duplicate *crypto backends* are bans, not this.
if cargo deny --locked check -A duplicate -A license-exception-not-encountered licenses bans sources; then
    pass "cargo deny licenses bans sources"
else
    fail "cargo deny licenses bans sources"
fi

step "shipped crates use ring and no other crypto backend"
tree_args=(--locked -e normal,build --target all --prefix none --format '{p}')
for c in "${SHIPPED[@]}"; do tree_args+=(-p "$c"); done
if graph=$(cargo tree "${tree_args[@]}" 2>&1); then
    names=$(awk '{print $1}' <<<"$graph" | sort -u)
    bad=$(grep -E "$FORBIDDEN_CRYPTO" <<<"$names" || true)
    if [[ -n "$bad" ]]; then
        echo "second crypto backend in the shipped graph: $(tr '\n' ' ' <<<"$bad")" >&2
        echo "  find the path with: cargo tree --locked -e normal,build -i <crate>" >&2
        fail "shipped graph: ring only"
    elif ! grep -qx ring <<<"$names"; then
        echo "ring is not in the shipped graph: the crypto provider changed?" >&2
        fail "shipped graph: ring only"
    else
        echo "$(wc -l <<<"$names") crates in the normal graph of ${SHIPPED[*]}; crypto: ring$(grep -qx rsa <<<"$names" && echo ' (and rsa, for RSA key generation only)')"
        pass "shipped graph: ring only"
    fi
else
    echo "$graph" >&2
    fail "shipped graph: ring only"
fi

if [[ -f fuzz/Cargo.toml && -f fuzz/Cargo.lock ]]; then
    step "cargo deny: licenses, bans, sources (fuzz/, its own workspace)"
    # unused-wrapper: the test-only wrappers of deny.toml are not in fuzz/.
    if cargo deny --locked --manifest-path fuzz/Cargo.toml check -A duplicate -A unused-wrapper licenses bans sources; then
        pass "cargo deny (fuzz/)"
    else
        fail "cargo deny (fuzz/)"
    fi
fi

step "RustSec advisories"
audit=${TESSERA_CARGO_AUDIT:-0}
if [[ -n "${TESSERA_ADVISORY_DB:-}" ]]; then
    db=$(cd "$TESSERA_ADVISORY_DB" && pwd)
    if ! git -C "$db" rev-parse --verify -q HEAD >/dev/null; then
        echo "TESSERA_ADVISORY_DB=$db is not a git checkout of rustsec/advisory-db" >&2
        fail "advisories (local database)"
    else
        echo "advisory database: $db at $(git -C "$db" log -1 --format='%h, committed %cI')"
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        mkdir "$tmp/dbs"
        ln -s "$db" "$tmp/dbs/$ADVISORY_DB_DIRNAME"
        # Same deny.toml, pointed at the local copy.
        sed "s#^db-path = .*#db-path = \"$tmp/dbs\"#" deny.toml >"$tmp/deny.toml"
        if cargo deny --locked --offline --config "$tmp/deny.toml" check advisories; then
            pass "cargo deny advisories (local database, no fetch)"
        else
            fail "cargo deny advisories (local database, no fetch)"
        fi
        if [[ "$audit" == 1 ]]; then
            install_tool cargo-audit cargo-audit "$CARGO_AUDIT_VERSION"
            ignores=()
            for id in $(ignored_advisories); do ignores+=(--ignore "$id"); done
            if cargo audit --db "$db" --no-fetch --stale "${ignores[@]}" --deny warnings; then
                pass "cargo audit (local database, no fetch)"
            else
                fail "cargo audit (local database, no fetch)"
            fi
        fi
    fi
elif [[ "${TESSERA_ADVISORIES:-}" == online ]]; then
    if cargo deny --locked check advisories; then
        pass "cargo deny advisories (fetched)"
    else
        fail "cargo deny advisories (fetched)"
    fi
    if [[ "$audit" == 1 ]]; then
        install_tool cargo-audit cargo-audit "$CARGO_AUDIT_VERSION"
        ignores=()
        for id in $(ignored_advisories); do ignores+=(--ignore "$id"); done
        if cargo audit "${ignores[@]}" --deny warnings; then
            pass "cargo audit (fetched)"
        else
            fail "cargo audit (fetched)"
        fi
    fi
else
    skipped=$((skipped + 1))
    {
        echo "WARNING: RustSec advisories were NOT checked."
        echo "WARNING: the advisory database is fetched from GitHub, which this machine cannot reach,"
        echo "WARNING: and no package registry reachable here carries a copy of it."
        echo "WARNING: known-vulnerable dependencies would pass this script unnoticed. Where GitHub is reachable run:"
        echo "WARNING:   TESSERA_ADVISORIES=online TESSERA_CARGO_AUDIT=1 bash scripts/supply-chain.sh"
        echo "WARNING: (= cargo deny --locked check advisories && cargo audit), or point"
        echo "WARNING: TESSERA_ADVISORY_DB at a git checkout of rustsec/advisory-db to check offline."
    } >&2
    if [[ "${TESSERA_REQUIRE_ADVISORIES:-0}" == 1 ]]; then
        fail "advisories required (TESSERA_REQUIRE_ADVISORIES=1) but no database available"
    fi
fi

echo
echo "supply-chain: took $(($(date +%s) - started))s"
if ((failed > 0)); then
    printf 'failed: %s\n' "${failures[@]}" >&2
fi
if ((skipped > 0)); then
    echo "supply-chain: $passed passed, $failed failed, $skipped skipped"
else
    echo "supply-chain: $passed passed, $failed failed"
fi
((failed == 0))
