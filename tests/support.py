"""Helpers shared by the tests: textured images, and a tiny 12-class MSHP student saved as a checkpoint + its bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def textured_images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Textured test images (uint8 NHWC): smooth gradients plus noise, deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b, c = rng.random(3)
        base = np.stack([np.sin(6 * a * xx + 3 * b * yy), np.cos(5 * b * yy), np.sin(4 * c * (xx + yy))], -1)
        img = 127 + 80 * base + rng.normal(0, 20, (size, size, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def make_student(root: Path, family: str = "mshp", seed: int = 0) -> tuple[Path, Path]:
    """An untrained tiny student with entropy tables, saved to ``root`` with an exported bundle."""
    import torch

    from splitbits.export.bundle import export_bundle
    from splitbits.trainer.checkpoint import save_checkpoint
    from splitbits.trainer.models import ModelSpec, build_model

    torch.manual_seed(seed)
    spec = ModelSpec(arch="tiny", family=family, num_classes=12, input_size=64)
    model = build_model(spec).eval()
    model.update_entropy_tables(force=True)
    ckpt = save_checkpoint(root / f"student_{family}.pt", model, spec, kind="student",
                           config={"student": {"beta": 0.16}}, metrics={"finished": True})
    bundle = export_bundle(model, root / f"bundle_{family}", images=textured_images(4), overwrite=True,
                           source=str(ckpt)).path
    return ckpt, bundle


# What a device install lacks (`pip install 'splitbits[runtime]'`): importing any of these fails.
TRAIN_ONLY_MODULES = ("skimage", "torch", "torchvision", "compressai", "timm")

_BLOCKER = '''"""Test harness: make this interpreter look like a runtime-only install (see tests/support.py)."""
import importlib.abc
import sys

BLOCKED = {blocked!r}


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: runtime-only test)", name=name)
        return None


sys.meta_path.insert(0, _Block())
'''


def runtime_only_env(root: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` for a subprocess in which :data:`TRAIN_ONLY_MODULES` cannot be imported (nor found by
    ``importlib.util.find_spec``): a ``sitecustomize`` on ``PYTHONPATH`` puts a blocking finder first
    on ``sys.meta_path`` before any other code runs."""
    d = Path(root) / "runtime_only_site"
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(_BLOCKER.format(blocked=TRAIN_ONLY_MODULES))
    pp = env.get("PYTHONPATH")
    return {**env, "PYTHONPATH": str(d) + (":" + pp if pp else ""), "PYTHONUNBUFFERED": "1"}


def tamper_tail(src: Path, dst: Path) -> Path:
    """A copy of a bundle whose tail's fc bias is shifted (manifest re-hashed: a consistent but wrong
    bundle that only golden verification can catch)."""
    import json
    import shutil

    import onnx
    from onnx import numpy_helper

    from splitbits.export.bundle import _write_manifest

    shutil.copytree(src, dst)
    m = onnx.load(str(dst / "tail.onnx"))
    for init in m.graph.initializer:
        if init.name.endswith("fc.bias"):
            arr = numpy_helper.to_array(init).copy()
            arr[0] += 5.0
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(m, str(dst / "tail.onnx"))
    manifest = json.loads((dst / "manifest.json").read_text())
    _write_manifest(dst, manifest)
    return dst


def stop_server(proc) -> None:
    """Stop a ``splitbits serve`` subprocess as a user would (SIGTERM: it drains and writes its stats),
    killing it only if it has not exited within 30 s."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
