# Sourced by demo.sh and test.sh: create (once) and activate the project's virtual environment.
#
# - Needs Python 3.11 or newer ($PYTHON, default python3); an older one ends with one line.
# - A virtual environment without a working python or pip (e.g. "python3 -m venv" on Debian
#   without python3-venv) is removed and created again.
# - PyTorch is installed first, from PyTorch's CPU wheel index, so that no multi-GB CUDA build is
#   pulled in; where that index cannot be reached, the plain package name is installed instead.
#   Then onnxforge with its extras, at the versions in constraints.txt (the ones CI runs).
# - Installs again only when pyproject.toml, constraints.txt or this file change (a stamp in the
#   environment). Each step is logged to stderr; pip's own output goes to $VENV/install.log.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ONNXFORGE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
ONNXFORGE_TORCH_VERSION="2.13.0"
ONNXFORGE_TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

_onnxforge_say() {
    echo "onnxforge set-up: $*" >&2
    if [ -d "$VENV" ]; then echo "onnxforge set-up: $*" >>"$VENV/install.log"; fi
}

_onnxforge_fail() {
    echo "onnxforge set-up: error: $*" >&2
    exit 1
}

# A usable environment: Python 3.11+ that runs, and a pip that runs.
_onnxforge_venv_ok() {
    "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 &&
        "$VENV/bin/python" -m pip --version >/dev/null 2>&1
}

_onnxforge_check_python() {
    command -v "$PYTHON" >/dev/null 2>&1 ||
        _onnxforge_fail "'$PYTHON' not found; onnxforge needs Python 3.11 or newer: install it and run again with PYTHON=python3.11"
    local version
    if ! version="$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3]); sys.exit(sys.version_info < (3, 11))' 2>/dev/null)"; then
        _onnxforge_fail "onnxforge needs Python 3.11 or newer, but $PYTHON is Python ${version:-of unknown version} ($(command -v "$PYTHON")); install Python 3.11+ and run again with PYTHON=python3.11"
    fi
    echo "$version"
}

_onnxforge_create_venv() {
    if [ -e "$VENV" ]; then
        if [ -f "$VENV/pyvenv.cfg" ]; then
            _onnxforge_say "$VENV has no working Python 3.11+ with pip (a half-created environment?); creating it again"
            rm -rf "$VENV"
        elif [ -d "$VENV" ] && [ -z "$(ls -A "$VENV")" ]; then
            rmdir "$VENV"
        else
            _onnxforge_fail "$VENV exists but is not a virtual environment; remove it, or set ONNXFORGE_VENV to another folder"
        fi
    fi
    local version output
    version="$(_onnxforge_check_python)" || exit 1
    echo "onnxforge set-up: creating a virtual environment in $VENV with $PYTHON (Python $version)" >&2
    if ! output="$("$PYTHON" -m venv "$VENV" 2>&1)" || ! _onnxforge_venv_ok; then
        rm -rf "$VENV"
        _onnxforge_fail "'$PYTHON -m venv' did not create an environment with a working pip ($(echo "$output" | grep -v '^\s*$' | tail -n 1)); on Debian/Ubuntu install the venv package (apt install python3-venv, or python3.X-venv for your version) and run again"
    fi
}

_onnxforge_pip() {
    python -m pip "$@" >>"$VENV/install.log" 2>&1
}

_onnxforge_torch_version() {
    python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true
}

# PyTorch's CPU wheel index first, and only that index (the user's extra indexes and local wheel
# folders are left out, so that this attempt shows whether the index itself answers), with a short
# timeout so an offline machine moves on; then the plain package name.
_onnxforge_install_torch() {
    local installed
    installed="$(_onnxforge_torch_version)"
    if [ "${installed%%+*}" = "$ONNXFORGE_TORCH_VERSION" ]; then
        _onnxforge_say "torch $installed is already installed"
        return
    fi
    if [ "$(uname -s)" = Linux ]; then
        _onnxforge_say "torch: trying PyTorch's CPU wheel index first: pip install --index-url $ONNXFORGE_TORCH_CPU_INDEX torch==$ONNXFORGE_TORCH_VERSION (timeout 10 s, no retries)"
        if env -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
            python -m pip install --timeout 10 --retries 0 --index-url "$ONNXFORGE_TORCH_CPU_INDEX" \
            "torch==$ONNXFORGE_TORCH_VERSION" >>"$VENV/install.log" 2>&1; then
            _onnxforge_say "torch: installed torch $(_onnxforge_torch_version) from PyTorch's CPU wheel index"
            return
        fi
        local why
        # pip does not say why it found nothing; ask the index once more, directly
        why="$(python -c '
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=10).close()
    print("answered, but pip found no matching wheel for this machine")
except Exception as exc:
    print("could not be reached: %s" % (getattr(exc, "reason", None) or exc))
' "$ONNXFORGE_TORCH_CPU_INDEX" 2>&1 | tail -n 1)"
        _onnxforge_say "torch: PyTorch's CPU wheel index $why; falling back to: pip install torch==$ONNXFORGE_TORCH_VERSION"
    else
        _onnxforge_say "torch: on $(uname -s) the default build is the CPU build: pip install torch==$ONNXFORGE_TORCH_VERSION"
    fi
    _onnxforge_pip install -c "$ROOT/constraints.txt" "torch==$ONNXFORGE_TORCH_VERSION" ||
        _onnxforge_fail "pip install torch==$ONNXFORGE_TORCH_VERSION failed; see $VENV/install.log"
    _onnxforge_say "torch: installed torch $(_onnxforge_torch_version) by the fallback"
    if python -c 'import importlib.metadata as m, sys; sys.exit(not any(r.startswith("nvidia") for r in m.requires("torch") or []))' 2>/dev/null; then
        _onnxforge_say "torch: warning: this is a CUDA build of torch (several GB of nvidia-* wheels); for the CPU build: pip install --force-reinstall --index-url $ONNXFORGE_TORCH_CPU_INDEX torch==$ONNXFORGE_TORCH_VERSION"
    fi
}

if ! _onnxforge_venv_ok; then
    _onnxforge_create_venv
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.onnxforge-installed"
# The stamp hashes what decides the installation; Python's hashlib (sha256sum is not on macOS).
want="$(python -c '
import hashlib, sys
digest = hashlib.sha256()
for name in sys.argv[1:]:
    with open(name, "rb") as f:
        digest.update(f.read())
print(digest.hexdigest())
' "$ROOT/pyproject.toml" "$ROOT/constraints.txt" "$ROOT/scripts/env.sh")"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') ==" >>"$VENV/install.log"
    _onnxforge_say "installing onnxforge and its dependencies into $VENV (the first run takes a few minutes; pip's output: $VENV/install.log)"
    _onnxforge_pip install --upgrade pip ||
        _onnxforge_say "could not upgrade pip (offline?); going on with $(python -m pip --version | cut -d' ' -f1-2)"
    _onnxforge_install_torch
    _onnxforge_pip install -c "$ROOT/constraints.txt" -e "$ROOT[dev]" ||
        _onnxforge_fail "installing onnxforge failed; see $VENV/install.log ($(tail -n 1 "$VENV/install.log"))"
    _onnxforge_say "installed onnxforge with torch $(_onnxforge_torch_version)"
    echo "$want" >"$stamp"
fi
export HF_HUB_OFFLINE=1
cd "$ROOT"
