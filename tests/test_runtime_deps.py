"""The runtime must run on a Jetson with numpy/onnxruntime/numba/constriction only."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import splitbits.runtime

RUNTIME_DIR = Path(splitbits.runtime.__file__).parent
FORBIDDEN = ("torch", "compressai", "torchvision", "timm")


def _runtime_modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages([str(RUNTIME_DIR)], prefix="splitbits.runtime.")]


def test_importing_every_runtime_module_pulls_in_no_torch():
    mods = ["splitbits.runtime", *_runtime_modules()]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ImportError as e:\n"
        "        if any(x in str(e) for x in ('tensorrt', 'cuda', 'numba', 'constriction')): continue\n"
        "        raise\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print(len(sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(mods) > 10


def test_no_runtime_source_imports_torch_or_compressai():
    pat = re.compile(r"^\s*(import|from)\s+(torch|compressai|torchvision|timm)\b", re.M)
    offenders = [str(p) for p in RUNTIME_DIR.rglob("*.py") if pat.search(p.read_text())]
    assert offenders == []
