#!/usr/bin/env bash
# The whole test suite except GPU tests. Usage: bash scripts/test.sh [extra pytest args]
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest -m "not gpu" "$@"
