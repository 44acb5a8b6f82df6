"""The runtime must run on a Jetson with numpy/onnxruntime/numba/constriction only."""

from __future__ import annotations

import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_public_api_is_one_import_and_lazy():
    """``from splitbits.runtime import EdgeEncoder, ServerDecoder, load_bundle`` (and the other public
    names) gives the real objects, while importing the package alone loads no numpy (``splitbits --help``)."""
    code = (
        "import json, sys\n"
        "import splitbits.runtime as r\n"
        "before = [m for m in ('numpy', 'onnxruntime', 'numba') if m in sys.modules]\n"
        "from splitbits.runtime import EdgeEncoder, ServerDecoder, load_bundle, verify_backend, get_backend\n"
        "from splitbits.runtime import SplitbitsError\n"
        "from splitbits.runtime import bundle, pipeline, verify\n"
        "same = [EdgeEncoder is pipeline.EdgeEncoder, load_bundle is bundle.load_bundle,\n"
        "        verify_backend is verify.verify_backend, issubclass(r.BundleError, SplitbitsError)]\n"
        "missing = [n for n in r.__all__ if getattr(r, n, None) is None]\n"
        "print(json.dumps({'before': before, 'same': same, 'all': missing,\n"
        "                  'dir': sorted(set(r.__all__) - set(dir(r)))}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"before": [], "same": [True] * 4, "all": [], "dir": []}
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        splitbits.runtime.NoSuchThing  # noqa: B018


def test_public_api_encodes_and_decodes(tiny_bundles, images):
    from splitbits.runtime import EdgeEncoder, ServerDecoder, load_bundle, verify_backend

    bundle = load_bundle(tiny_bundles["mshp"])
    enc, dec = EdgeEncoder(bundle, "onnxruntime"), ServerDecoder(bundle, "onnxruntime")
    assert dec.decode(enc.encode(images[0])).shape == (10,)
    assert verify_backend(bundle, "onnxruntime").ok


def test_bench_and_send_on_builtin_run_without_train_dependencies(tiny_bundles, tmp_path):
    """What a device install (`pip install 'splitbits[runtime]'`) must do: `splitbits bench BUNDLE` and
    `splitbits send` (against `splitbits serve`) on the builtin dataset, in interpreters where
    scikit-image, torch and compressai cannot be imported (a blocking finder installed by sitecustomize)."""
    import os

    from support import TRAIN_ONLY_MODULES, runtime_only_env, stop_server

    env = runtime_only_env(tmp_path, {**os.environ, "SPLITBITS_CACHE": str(tmp_path / "cache")})
    for mod in TRAIN_ONLY_MODULES:
        probe = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True, env=env)
        assert probe.returncode != 0 and "blocked" in probe.stderr, mod
    cli = [sys.executable, "-m", "splitbits.runtime.cli"]
    bundle = str(tiny_bundles["mshp"])
    res = subprocess.run([*cli, "bench", bundle, "--backend", "onnxruntime", "--limit", "6", "--warmup", "1",
                          "--json", str(tmp_path / "bench.json"), "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["inputs"]["dataset"].startswith("builtin") and bench["images"] == 6, bench["inputs"]
    srv = subprocess.Popen([*cli, "serve", bundle, "--port", "0", "--backend", "onnxruntime"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = srv.stdout.readline()
        m = re.search(r"listening on ([\d.]+):(\d+)", line)
        assert m, line + srv.stderr.read()
        res = subprocess.run([*cli, "send", bundle, "--server", f"{m.group(1)}:{m.group(2)}", "--limit", "5",
                              "--backend", "onnxruntime", "--json", str(tmp_path / "send.json"), "--no-progress"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        sent = json.loads((tmp_path / "send.json").read_text())
        assert sent["answered_ok"] == 5 and sent["images"] == 5
    finally:
        stop_server(srv)
