"""Shared fixtures: tiny split models (untrained but with compressai tables) and their bundles."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from support import textured_images

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def images() -> np.ndarray:
    return textured_images(6)


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


@pytest.fixture
def bundle_copy(tiny_bundles, tmp_path):
    """A factory: family -> a private copy of that tiny bundle (for tests that write into it)."""

    def make(family: str):
        dst = tmp_path / family
        shutil.copytree(tiny_bundles[family], dst)
        return dst

    return make
