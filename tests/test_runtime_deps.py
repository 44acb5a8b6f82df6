"""The runtime must run on a Jetson with numpy/onnxruntime/numba/constriction only."""

from __future__ import annotations

import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import splitbits.runtime

RUNTIME_DIR = Path(splitbits.runtime.__file__).parent
FORBIDDEN = ("torch", "compressai", "torchvision", "timm", "ray")


def _runtime_modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages([str(RUNTIME_DIR)], prefix="splitbits.runtime.")]


def test_importing_every_runtime_module_pulls_in_no_torch():
    """Import each runtime module in a fresh interpreter; only modules for hardware absent here
    (TensorRT, CUDA) may fail to import, and none may pull in torch, compressai or ray."""
    mods = ["splitbits.runtime", *_runtime_modules()]
    code = (
        "import importlib, json, sys\n"
        "skipped = {}\n"
        f"for m in {mods!r}:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ImportError as e:\n"
        "        skipped[m] = str(e)\n"
        f"print(json.dumps({{'skipped': skipped, 'forbidden': [m for m in {FORBIDDEN!r} if m in sys.modules]}}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["forbidden"] == []
    assert all(re.search(r"tensorrt|cuda", why) for why in out["skipped"].values()), out["skipped"]
    assert len(mods) - len(out["skipped"]) > 20  # the walk found the package (the codec, backends, link, ...)


def test_no_runtime_source_imports_torch_or_compressai():
    pat = re.compile(r"^\s*(import|from)\s+(torch|compressai|torchvision|timm|ray)\b", re.M)
    offenders = [str(p) for p in RUNTIME_DIR.rglob("*.py") if pat.search(p.read_text())]
    assert offenders == []
