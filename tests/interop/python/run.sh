#!/usr/bin/env bash
# Runs the py-spiffe / spiffe-tls interop suite against a fresh Tessera agent.
#   tests/interop/python/run.sh [extra pytest args]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
./setup.sh
../agent.sh .venv/bin/python -m pytest -q test_interop.py "$@"
# The JWT-SVID tests again against an agent signing RS256 (jwt_key_type =
# "rsa-2048", what Microsoft Entra needs): py-spiffe's bundle and JwtSvid,
# PyJWT from the bundle and by OpenID discovery, ValidateJWTSVID.
TESSERA_JWT_KEY_TYPE=rsa-2048 exec ../agent.sh .venv/bin/python -m pytest -q test_interop.py -k jwt "$@"
