#!/usr/bin/env bash
# Runs the java-spiffe interop suite against a fresh Tessera agent.
#   tests/interop/java/run.sh [extra mvn args, e.g. -Dtest=MtlsInteropTest]
# Needs the agent built (cargo build -p tessera-agent), JDK 17 and Maven.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/setup.sh"
cd "$here"
# Not -q: Surefire's "Tests run: N, Failures: 0 ..." summary must print.
exec ../agent.sh mvn -B -o -Dstyle.color=never test "$@"
