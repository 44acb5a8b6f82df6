#!/usr/bin/env bash
# splitbits on a Jetson (JetPack 6.1 or 6.2 = L4T r36.4.x: Python 3.10, CUDA 12.6, TensorRT 10.3):
# a virtualenv that sees JetPack's TensorRT, the runtime (+ jetson) extra, and a check that prints
# what was found. JetPack 6.0 (L4T r36.3: TensorRT 8.6, CUDA 12.2) and JetPack 5 are refused:
# splitbits needs TensorRT 10 (upgrade 6.0 to L4T r36.4, see jetson/README.md).
#
#   jetson/setup.sh [VENV_DIR]            default VENV_DIR: ~/.venvs/splitbits
#   jetson/setup.sh --check-release [FILE]
#                                         only check the L4T release (default /etc/nv_tegra_release)
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
die() { printf '\033[31mERROR: %s\033[0m\n' "$*" >&2; exit 1; }

# cuda-python whose CUDA runtime JetPack 6.1/6.2's driver (CUDA 12.6) supports: newer releases
# (12.8+, 12.9 links cudart 12.9 statically) fail there with cudaErrorInsufficientDriver.
CUDA_PYTHON='cuda-python>=12.6,<12.7'

# check_release FILE: L4T r36.4.x (JetPack 6.1 / 6.2) passes; anything else fails with the reason.
check_release() {
    local line major rev
    line=$(head -n1 "$1")
    major=$(sed -n 's/^# R\([0-9]*\) .*/\1/p' <<<"$line")
    rev=$(sed -n 's/.*REVISION: *\([0-9]*\)\..*/\1/p' <<<"$line")
    if [ "$major" = 36 ] && [ -n "$rev" ] && [ "$rev" -ge 4 ]; then
        echo "L4T r$major.$rev: JetPack 6.1 or 6.2, supported"
        return 0
    fi
    echo "L4T '$line' is not supported: splitbits needs JetPack 6.1 or 6.2 (L4T r36.4 or later r36: TensorRT 10.3," \
         "CUDA 12.6); JetPack 6.0 (r36.3) ships TensorRT 8.6 and JetPack 5 (r35) TensorRT 8.5:" \
         "upgrade (jetson/README.md)" >&2
    return 1
}

if [ "${1:-}" = --check-release ]; then
    check_release "${2:-/etc/nv_tegra_release}"
    exit
fi

say "platform"
[ "$(uname -m)" = aarch64 ] || warn "not aarch64 ($(uname -m)): this script is for a Jetson; on a desktop use 'make test'"
if [ -f /etc/nv_tegra_release ]; then
    head -n1 /etc/nv_tegra_release
    check_release /etc/nv_tegra_release || exit 1
else
    warn "/etc/nv_tegra_release not found: not a Jetson (continuing; TensorRT/power checks will say what is missing)"
fi
"$PY" --version
if ! "$PY" -c "import tensorrt" 2>/dev/null; then
    warn "JetPack's TensorRT Python bindings are not visible to $PY: sudo apt install python3-libnvinfer python3-libnvinfer-dev"
elif ! "$PY" -c "import sys, tensorrt; sys.exit(int(tensorrt.__version__.split('.')[0]) < 10)"; then
    die "TensorRT $("$PY" -c 'import tensorrt; print(tensorrt.__version__)') is too old: splitbits needs TensorRT 10 (JetPack 6.1 or 6.2)"
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
        "$CUDA_PYTHON" "onnx>=1.15" "scikit-image>=0.22"
else
    "$VENV/bin/pip" install -e "$REPO[jetson]"  # the extra pins $CUDA_PYTHON
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
