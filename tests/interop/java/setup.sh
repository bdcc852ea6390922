#!/usr/bin/env bash
# Fetches everything the java-spiffe interop suite needs from Maven Central
# into the local Maven repository (~/.m2) and compiles the tests, so that
# run.sh can run Maven offline. Idempotent: a second run downloads nothing.
set -euo pipefail
cd "$(dirname "$0")"
command -v mvn >/dev/null || { echo "setup.sh: mvn not found (Maven 3.8+ and JDK 17 needed)" >&2; exit 2; }
# test-compile resolves the test classpath and the build plugins up to
# compiling; the surefire run with no test selected loads the surefire plugin
# with its JUnit Platform provider (a plugin dependency in pom.xml) without
# needing an agent.
mvn -B -q -Dstyle.color=never test-compile
mvn -B -q -Dstyle.color=never surefire:test -Dtest=NoSuchTest -Dsurefire.failIfNoSpecifiedTests=false
