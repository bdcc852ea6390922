#!/usr/bin/env bash
# Fuzz every target for a fixed time (CI calls this; RELIABILITY.md, "Fuzzing").
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET ...]
#
# SECONDS_PER_TARGET defaults to 20; no TARGET means all of them. Needs the
# `nightly` rustup toolchain (cargo-fuzz instruments with nightly-only flags)
# and installs the pinned cargo-fuzz if it is missing. Builds all targets once,
# runs each with libFuzzer's -max_total_time, and exits non-zero on any crash,
# timeout or out-of-memory, printing the reproducer's path and the command that
# replays it. New inputs found go to a scratch directory, not the committed
# corpus (fuzz/corpus/<target>/), which is only read.
#
# Environment: FUZZ_TOOLCHAIN (default nightly), FUZZ_OUT (default
# fuzz/out: logs, scratch corpora, crash artifacts), FUZZ_JOBS (targets run at
# once; default 2 on a machine with 2 or more cores, else 1), FUZZ_TARGET_DIR (cargo target dir; default
# ~/.cache/tessera/fuzz-target, outside the work tree so that a fresh clone on
# the same machine, as in CI, reuses the instrumented dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
t0=$(date +%s)

CARGO_FUZZ_VERSION=0.13.1
toolchain=${FUZZ_TOOLCHAIN:-nightly}
secs=${1:-20}
shift $(($# > 0 ? 1 : 0))
out=${FUZZ_OUT:-$root/fuzz/out}
jobs=${FUZZ_JOBS:-$(($(nproc) >= 2 ? 2 : 1))}
target_dir=${FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera/fuzz-target}
triple=x86_64-unknown-linux-gnu

die() { echo "fuzz/run.sh: $*" >&2; exit 2; }
[[ $secs =~ ^[0-9]+$ && $secs -gt 0 ]] || die "SECONDS_PER_TARGET must be a positive integer, got '$secs'"
command -v rustup >/dev/null || die "rustup is required (the fuzz targets build with its '$toolchain' toolchain)"
if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
  die "the '$toolchain' Rust toolchain is not installed; cargo-fuzz needs nightly (rustup toolchain install nightly). Not skipping."
fi
if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

# Every [[bin]] of fuzz/Cargo.toml is a target.
all=$(sed -n 's/^name = "\([a-z0-9_]*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^tessera-fuzz$' || true)
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || read -r -a targets <<<"$(echo $all)"
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$all" || die "unknown target '$t' (targets: $(echo $all))"
done

# Per-target libFuzzer input size limit: the size the real input is bounded
# by, or what the target needs to reach its interesting paths.
max_len() {
  case $1 in
    exchange_form) echo 65536 ;;   # the exchange socket's body limit (MAX_BODY_BYTES)
    podlist | config | policy | jwt) echo 16384 ;;
    *) echo 4096 ;;
  esac
}

# One build for all targets: no sanitizer (the code under test forbids
# unsafe; coverage feedback and panics are what matter), debug assertions and
# overflow checks on, 16 codegen units to keep the build lean.
build_flags=(-O -a -s none --codegen-units 16 --target "$triple" --target-dir "$target_dir")
echo "==== fuzz: build (${targets[*]})"
start=$(date +%s)
cargo "+$toolchain" fetch --locked --manifest-path fuzz/Cargo.toml >/dev/null
cargo "+$toolchain" fuzz build "${build_flags[@]}"
echo "fuzz: build took $(($(date +%s) - start)) s"
bin_dir=$target_dir/$triple/release

mkdir -p "$out"
run_one() {
  local t=$1
  local scratch=$out/corpus/$t art=$out/artifacts/$t log=$out/$t.log
  rm -rf "$art"
  mkdir -p "$scratch" "$art"
  local status=0
  "$bin_dir/$t" "$scratch" "fuzz/corpus/$t" \
    -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$art/" -print_final_stats=1 >"$log" 2>&1 || status=$?
  local execs rate
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  local found
  found=$(find "$art" -type f | head -5)
  if [[ $status -ne 0 || -n $found ]]; then
    {
      echo "FUZZ FAILURE: target $t (exit $status); last lines of $log:"
      grep -E 'panicked|ERROR|SUMMARY|Test unit written|timeout|out-of-memory' "$log" | head -20 || true
      tail -25 "$log"
      for f in $found; do
        echo "reproducer: $f"
        echo "  replay:  $bin_dir/$t $f"
        echo "  or:      cargo +$toolchain fuzz run ${build_flags[*]} $t $f"
      done
      [[ -n $found ]] || echo "no reproducer was written; see $log"
    } >&2
    echo "$t FAILED" >"$out/$t.result"
    return 1
  fi
  printf '%-14s %10s execs %8s exec/s  %3s s  ok\n' "$t" "${execs:-?}" "${rate:-?}" "$secs" | tee "$out/$t.result"
}

echo "==== fuzz: ${#targets[@]} targets x ${secs} s (logs in $out)"
failed=()
if [[ $jobs -le 1 ]]; then
  for t in "${targets[@]}"; do
    run_one "$t" || failed+=("$t")
  done
else
  pids=()
  for t in "${targets[@]}"; do
    while [[ $(jobs -rp | wc -l) -ge $jobs ]]; do wait -n || true; done
    run_one "$t" &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed+=("${targets[$i]}")
  done
fi

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzz: FAILED: ${failed[*]} (reproducers above; add each to fuzz/corpus/<target>/ and a regression test once fixed)" >&2
  exit 1
fi
echo "fuzz: total $(($(date +%s) - t0)) s (build and runs)"
echo "fuzz: ${#targets[@]} passed, 0 failed"
