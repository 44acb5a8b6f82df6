"""Corruptions: all 19 names run, seeded and reproducible, batching-independent, clear errors, no torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("imagecorruptions")

from support import textured_images

from splitbits.runtime.corruptions import (
    CORRUPTIONS,
    CorruptionError,
    check_corruption,
    corrupt,
    image_seed,
)

RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "snow", "frost", "elastic_transform",
          "speckle_noise", "spatter")


@pytest.fixture(scope="module")
def imgs() -> np.ndarray:
    return textured_images(3, size=40)


def test_names_match_library() -> None:
    import imagecorruptions

    assert tuple(imagecorruptions.get_corruption_names("all")) == CORRUPTIONS
    assert len(CORRUPTIONS) == 19


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_runs_and_is_reproducible(imgs: np.ndarray, name: str) -> None:
    a = corrupt(imgs, name, 2, seed=3)
    b = corrupt(imgs, name, 2, seed=3)
    assert a.dtype == np.uint8 and a.shape == imgs.shape
    assert np.array_equal(a, b)
    if name in RANDOM:
        assert not np.array_equal(a, corrupt(imgs, name, 2, seed=4))


def test_batching_independent_and_global_rng_untouched(imgs: np.ndarray) -> None:
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    full = corrupt(imgs, "gaussian_noise", 3, seed=0)
    assert np.random.random() == before  # global numpy RNG restored
    one = corrupt(imgs[1:2], "gaussian_noise", 3, seed=0, indices=[1])
    assert np.array_equal(full[1:2], one)
    single = corrupt(imgs[1], "gaussian_noise", 3, seed=0, indices=[1])
    assert np.array_equal(single, full[1])
    assert image_seed(0, "gaussian_noise", 3, 1) == image_seed(0, "gaussian_noise", 3, 1)


def test_severity_changes_output(imgs: np.ndarray) -> None:
    assert not np.array_equal(corrupt(imgs, "contrast", 1), corrupt(imgs, "contrast", 5))


@pytest.mark.parametrize("name,severity,match", [
    ("gausian_noise", 1, "did you mean 'gaussian_noise'"),
    ("nonsense", 1, "unknown corruption"),
    ("fog", 0, "1..5"),
    ("fog", 6, "1..5"),
    ("fog", 2.5, "1..5"),
    ("fog", True, "1..5"),
])
def test_bad_names_and_severities(name: str, severity: object, match: str) -> None:
    with pytest.raises(CorruptionError, match=match):
        check_corruption(name, severity)  # type: ignore[arg-type]


def test_bad_images() -> None:
    with pytest.raises(CorruptionError, match="uint8"):
        corrupt(np.zeros((1, 40, 40, 3), np.float32), "fog", 1)
    with pytest.raises(CorruptionError, match="32"):
        corrupt(np.zeros((1, 16, 16, 3), np.uint8), "fog", 1)
    with pytest.raises(CorruptionError, match="indices"):
        corrupt(np.zeros((2, 40, 40, 3), np.uint8), "fog", 1, indices=[0])


def test_module_does_not_import_torch() -> None:
    code = ("import sys, numpy as np; from splitbits.runtime.corruptions import corrupt; "
            "corrupt(np.full((1, 32, 32, 3), 128, np.uint8), 'contrast', 1); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
