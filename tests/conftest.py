"""Shared fixtures: tiny split models (untrained but with compressai tables) and their bundles."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
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


@pytest.fixture(scope="session")
def images() -> np.ndarray:
    return _images(6)


@pytest.fixture(scope="session")
def tiny_models():
    """family -> untrained tiny SplitClassifier with entropy tables (seeded)."""
    torch = pytest.importorskip("torch")
    from splitbits.trainer.models import ModelSpec, build_model

    models = {}
    for fam in ("fp", "mshp"):
        torch.manual_seed(0)
        m = build_model(ModelSpec(arch="tiny", family=fam, num_classes=10, input_size=64)).eval()
        m.update_entropy_tables(force=True)
        models[fam] = m
    return models


@pytest.fixture(scope="session")
def tiny_bundles(tiny_models, images, tmp_path_factory):
    """family -> path of an exported, verified bundle of the tiny model."""
    from splitbits.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("bundles")
    return {fam: export_bundle(m, root / fam, images=images[:4]).path for fam, m in tiny_models.items()}
