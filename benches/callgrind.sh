#!/usr/bin/env bash
# Instruction counts per operation under callgrind: stable numbers for
# before/after comparisons (wall-clock medians move with the machine; these
# move only when the code does).
#
#   benches/callgrind.sh              # every operation
#   benches/callgrind.sh 'svid|jwt'   # operations whose name matches an ERE
#
# For each operation it runs `icount <op> 0` (setup + one warm-up call) and
# `icount <op> N` under `valgrind --tool=callgrind`, and prints
# (Ir(N) - Ir(0)) / N: the instructions of one call, setup excluded.
# N per operation comes from `icount list`; ICOUNT_ITERATIONS overrides it.
#
# Needs valgrind. Builds `icount` with the release profile (the one
# `cargo bench` uses).
set -euo pipefail
cd "$(dirname "$0")/.."

filter=${1:-.}
command -v valgrind >/dev/null || {
  echo "benches/callgrind.sh: valgrind is required (apt-get install valgrind)" >&2
  exit 2
}

cargo build --locked --release -q -p tessera-benches --bin icount
bin=target/release/icount

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Total instructions (Ir) of one run. A fixed, minimal environment and no
# ASLR keep the counts repeatable across runs and shells.
ir() {
  local out="$work/callgrind.out"
  rm -f "$out"
  if ! env -i PATH=/usr/bin:/bin setarch "$(uname -m)" -R \
    valgrind --tool=callgrind --callgrind-out-file="$out" -q "$bin" "$1" "$2" \
    >"$work/stdout" 2>"$work/stderr"; then
    echo "icount $1 $2 failed under valgrind:" >&2
    cat "$work/stderr" >&2
    exit 1
  fi
  awk '/^(summary|totals):/ { print $2; exit }' "$out"
}

printf '| %-42s | %10s | %14s | %14s |\n' operation iterations 'Ir/op' 'baseline Ir'
printf '|%s|%s:|%s:|%s:|\n' "$(printf -- '-%.0s' {1..44})" "$(printf -- '-%.0s' {1..11})" \
  "$(printf -- '-%.0s' {1..15})" "$(printf -- '-%.0s' {1..15})"
ran=0
while read -r op iterations; do
  [[ $op =~ $filter ]] || continue
  n=${ICOUNT_ITERATIONS:-$iterations}
  base=$(ir "$op" 0)
  total=$(ir "$op" "$n")
  per=$(((total - base) / n))
  printf '| %-42s | %10d | %14d | %14d |\n' "$op" "$n" "$per" "$base"
  ran=$((ran + 1))
done < <("$bin" list)

if [ "$ran" -eq 0 ]; then
  echo "no operation matches '$filter'; see: $bin list" >&2
  exit 1
fi
