# Sourced by demo.sh and test.sh: create (once) and activate the project's virtual environment.
# The CPU build of PyTorch is installed first, so no multi-GB CUDA build is pulled in.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ONNXFORGE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtual environment in $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.onnxforge-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/env.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing onnxforge and its dependencies into $VENV (first run takes a few minutes)" >&2
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet "torch==2.13.0"
    python -m pip install --quiet -e "$ROOT[dev]"
    echo "$want" > "$stamp"
fi
export HF_HUB_OFFLINE=1
cd "$ROOT"
