#!/usr/bin/env bash
# The main job on the built-in demo models. Usage: bash scripts/demo.sh [extra onnxforge demo flags]
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec onnxforge demo --out demo_out "$@"
