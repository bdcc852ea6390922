#!/usr/bin/env bash
# Fault-injection and attestation-attack tests, with their figures printed
# (RELIABILITY.md, sections "Faults" and "Attestation attacks").
#
#   sudo tests/faults/run.sh                 # the CI-sized run (~25 s of tests)
#   sudo TESSERA_FAULT_ITERATIONS=100 tests/faults/run.sh   # a longer kill -9 loop
#   TESSERA_FAULT_SEED=<seed> ...            # replay the kill points of a run
#
# Must run as root: tmpfs and cgroup2 mounts, remount read-only, setpriv to
# uid 65534, unshare of PID/user/mount namespaces. Not root = failure, never
# a silent skip. Needs util-linux (mount, unshare, setpriv), python3
# (/usr/bin/python3 for the unprivileged helper) and openssl.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
  echo "tests/faults/run.sh: MUST RUN AS ROOT (mounts, namespaces, setpriv)" >&2
  exit 1
fi
for tool in mount umount unshare setpriv python3 openssl; do
  command -v "$tool" >/dev/null || { echo "tests/faults/run.sh: '$tool' is required" >&2; exit 2; }
done
[ -x /usr/bin/python3 ] || [ -x /usr/local/bin/python3 ] || {
  echo "tests/faults/run.sh: a system python3 runnable by uid 65534 is required" >&2; exit 2; }

run() {
  local start=$SECONDS
  echo "==== cargo test $*"
  cargo test --locked "$@" -- --nocapture --test-threads 1
  echo "==== ($((SECONDS - start)) s including build)"
}
run -p tessera-agent --test faults
run -p tessera-tests --test faults
run -p tessera-tests --test attestation_attacks
