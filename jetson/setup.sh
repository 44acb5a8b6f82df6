#!/usr/bin/env bash
# splitbits on a Jetson (JetPack 6.x, Python 3.10): a virtualenv that sees JetPack's TensorRT,
# the runtime (+ jetson) extra, and a check that prints what was found.
#
#   jetson/setup.sh [VENV_DIR]            default VENV_DIR: ~/.venvs/splitbits
#
# Environment (optional):
#   SPLITBITS_ORT_WHEEL=/path/onnxruntime_gpu-*-cp310-*-linux_aarch64.whl
#       NVIDIA's Jetson build of onnxruntime-gpu (CUDA/TensorRT execution providers). Without it
#       the CPU onnxruntime from PyPI is installed (pip picks the newest release with a cp310 wheel).
#   PYTHON=python3.10                     the interpreter that has JetPack's TensorRT bindings
#
# TensorRT is never pip-installed here: the PyPI wheel would shadow JetPack's build inside the
# venv. It comes from apt (nvidia-jetpack, or: sudo apt install python3-libnvinfer).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
VENV=${1:-$HOME/.venvs/splitbits}
PY=${PYTHON:-python3}

say() { printf '\033[1m== %s\033[0m\n' "$*"; }
warn() { printf '\033[33mWARNING: %s\033[0m\n' "$*" >&2; }

say "platform"
[ "$(uname -m)" = aarch64 ] || warn "not aarch64 ($(uname -m)): this script is for a Jetson; on a desktop use 'make test'"
if [ -f /etc/nv_tegra_release ]; then
    head -n1 /etc/nv_tegra_release
else
    warn "/etc/nv_tegra_release not found: not a Jetson (continuing; TensorRT/power checks will say what is missing)"
fi
"$PY" --version
if ! "$PY" -c "import tensorrt" 2>/dev/null; then
    warn "JetPack's TensorRT Python bindings are not visible to $PY: sudo apt install python3-libnvinfer python3-libnvinfer-dev"
fi

say "virtualenv $VENV (--system-site-packages, for JetPack's TensorRT)"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip "setuptools>=68" wheel

say "packages"
if [ -n "${SPLITBITS_ORT_WHEEL:-}" ]; then
    # the GPU wheel provides the onnxruntime module: install the extra's other requirements by hand
    "$VENV/bin/pip" install "$SPLITBITS_ORT_WHEEL"
    "$VENV/bin/pip" install -e "$REPO" "numba>=0.59" "pillow>=10" "matplotlib>=3.7" \
        "cuda-python>=12,<13" "onnx>=1.15" "scikit-image>=0.22"
else
    "$VENV/bin/pip" install -e "$REPO[jetson]"
fi
# constriction has no aarch64 wheel: the Numba coder is the default there (nothing to do).

say "check"
"$VENV/bin/python" - <<'EOF'
import importlib

def version(mod):
    try:
        m = importlib.import_module(mod)
    except Exception as exc:  # report, do not fail: the device report below says what is usable
        return f"missing ({exc.__class__.__name__}: {exc})"
    return f"{getattr(m, '__version__', '?')}  {getattr(m, '__file__', '')}"

for mod in ("tensorrt", "onnxruntime", "numba", "numpy", "onnx", "cuda.bindings.runtime", "constriction"):
    print(f"{mod:24s} {version(mod)}")
try:
    import onnxruntime as ort
    print(f"{'onnxruntime providers':24s} {ort.get_available_providers()}")
except ImportError:
    pass
EOF
"$VENV/bin/splitbits" device
"$VENV/bin/splitbits" warmup >/dev/null && echo "coders compiled (numba cache warm)"

say "done"
cat <<EOF
Activate:  source $VENV/bin/activate
Next (see jetson/README.md):
  splitbits export BUNDLE --trt --precision fp16          # engines for this device, verified against golden/
  splitbits bench BUNDLE --backend tensorrt --precision fp16 --json results/\$(hostname)-fp16.json
EOF
