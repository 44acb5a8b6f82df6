#!/usr/bin/env bash
# The device check of issue 14 on a lent CUDA machine (Python 3.12 with torch, torchvision, numba,
# onnxruntime; no compressai/constriction; nothing downloadable), in ONE call of the device tool:
#
#   here:   jetson/device_wheels.sh .whl                    # ~1 MiB of wheels, from this working tree
#   device: run(command="bash jetson/device_check.sh .whl", carry=[".whl"], timeout_s=560)
#
# It installs the carried wheels over the machine's own packages (pip --target + PYTHONPATH: its
# python3 is itself a venv, so a --system-site-packages venv would lose its torch), probes the
# versions (exit 3, naming the wheel to carry, if something needed is missing; exit 4 if the
# splitbits wheel is older than this working tree), then runs `splitbits device check` (budget 420 s,
# killed after DEVICE_CHECK_TIMEOUT_S=500 s; its JSON is rewritten after every step, so a kill keeps
# the finished steps). Into $OUT (comes back from the device; default runs/device): probe.json,
# device-check.json, device-check.log. Commit the JSON as docs/device/<date>-<gpu>.json (its
# "path_in_repo"). Arguments after WHEELS go to `splitbits device check` (e.g. --budget-s 300,
# --skip numba_coder); `--probe` alone stops after the probe (seconds; the machine's start costs more).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
WHEELS=${1:-.whl}
[ $# -gt 0 ] && shift
OUT=${OUT:-runs/device}
PY=${PYTHON:-python3}
SITE=${SPLITBITS_SITE:-/tmp/splitbits-site}
LIMIT=${DEVICE_CHECK_TIMEOUT_S:-500}
export PYTHONUNBUFFERED=1

fail() { echo "device_check.sh: $2" >&2; exit "$1"; }

mkdir -p "$OUT" || fail 2 "cannot create $OUT"
compgen -G "$WHEELS/*.whl" >/dev/null \
    || fail 2 "no wheels in $WHEELS: run jetson/device_wheels.sh $WHEELS here first, and carry it"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || fail 2 "pip could not install the wheels in $WHEELS into $SITE (made for CPython 3.12, manylinux x86_64: pip says above which one does not fit)"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - "$OUT/probe.json" <<'EOF'
"""Probe: every package the check imports, torch's CUDA, and whether the splitbits wheel is this tree."""
import importlib, json, pathlib, platform, sys
from importlib.metadata import PackageNotFoundError, version

NEEDED = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "compressai": "compressai",
          "pytorch_msssim": "pytorch-msssim", "numba": "numba", "onnxruntime": "onnxruntime", "onnx": "onnx",
          "numpy": "numpy", "scipy": "scipy", "skimage": "scikit-image", "PIL": "pillow", "yaml": "pyyaml",
          "rich": "rich", "matplotlib": "matplotlib", "splitbits.runtime": "splitbits"}
OPTIONAL = {"constriction": "constriction"}
report = {"python": platform.python_version(), "libc": " ".join(platform.libc_ver()), "packages": {}}
missing = []
for mod, dist in {**NEEDED, **OPTIONAL}.items():
    try:
        importlib.import_module(mod)
        report["packages"][dist] = version(dist)
    except (ImportError, PackageNotFoundError, OSError, RuntimeError) as exc:
        report["packages"][dist] = f"MISSING ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if mod in NEEDED:
            missing.append(dist)
try:
    import torch
    report["torch_cuda"] = {"build": torch.version.cuda, "available": torch.cuda.is_available(),
                            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
except ImportError:
    torch = None
print(json.dumps(report, indent=1))
pathlib.Path(sys.argv[1]).write_text(json.dumps(report, indent=1) + "\n")
hint = {"torchvision": "torchvision=={tv} (torch {t} pairs with torchvision 0.<minor+15>; the same CUDA build)",
        "splitbits": "splitbits (jetson/device_wheels.sh builds it)"}
t = torch.__version__.split("+")[0] if torch else "?"
tv = f"0.{int(t.split('.')[1]) + 15}.{t.split('.')[2]}" if torch else "?"
for dist in missing:
    what = hint.get(dist, f"{dist} (add it to DEPS in jetson/device_wheels.sh)").format(tv=tv, t=t)
    if dist != "torchvision" and "torchvision" in missing and "torchvision" in report["packages"][dist]:
        what = "a working torchvision first (it imports torchvision)"
    print(f"device_check.sh: missing {dist}: carry {what}", file=sys.stderr)
if missing:
    sys.exit(3)
import splitbits.runtime
site = pathlib.Path(splitbits.runtime.__file__).resolve().parents[1]
stale = []
for pkg in ("runtime", "trainer", "export", "attacks", "jetson"):
    src, inst = pathlib.Path(pkg), site / pkg
    names = {p.relative_to(src) for p in src.rglob("*.py")} | {p.relative_to(inst) for p in inst.rglob("*.py")}
    stale += [f"{pkg}/{n}" for n in sorted(names) if not ((src / n).is_file() and (inst / n).is_file()
                                                         and (src / n).read_bytes() == (inst / n).read_bytes())]
if stale:
    print(f"device_check.sh: the splitbits wheel is not this working tree ({', '.join(stale[:5])}"
          f"{' ...' if len(stale) > 5 else ''}): rerun jetson/device_wheels.sh", file=sys.stderr)
    sys.exit(4)
EOF
rc=$?
[ $rc -eq 0 ] || exit $rc
[ "${1:-}" = "--probe" ] && exit 0

timeout -k 15 "$LIMIT" "$PY" -c 'import sys; from splitbits.runtime.cli import main; sys.exit(main(sys.argv[1:]))' \
    device check --json "$OUT/device-check.json" "$@" 2>&1 | tee "$OUT/device-check.log"
rc=${PIPESTATUS[0]}
[ $rc -eq 124 ] && echo "device_check.sh: stopped after $LIMIT s; $OUT/device-check.json holds the finished steps" >&2
exit $rc
