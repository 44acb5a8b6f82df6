"""The 19 ImageNet-C corruptions × severities 1–5, generated on the fly, seeded and reproducible.

numpy only (no torch): the on-device bench (``--attack corruption:...``) and the attacks use it.
The corruption functions come from
``imagecorruptions-imaug`` (import name ``imagecorruptions``), a maintained fork of Hendrycks'
``imagecorruptions`` that runs on current numpy; it is imported only when images are corrupted, so
:func:`check_corruption` works without it.

Reproducibility: every image gets its own random stream derived from ``(seed, corruption, severity,
index)`` (``index`` defaults to the position in the batch; pass the dataset indices to make an image's
corruption independent of how the data set is batched). The library draws from numpy's *global*
RNG, so that state is set per image and restored afterwards; ``glass_blur`` and ``impulse_noise`` take
the per-image seed directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from splitbits.runtime.errors import InputError

# The order of imagecorruptions' corruption_tuple (15 "common" + 4 "validation" corruptions).
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
_SEEDED_KWARG = ("glass_blur", "impulse_noise")  # take ``seed=`` instead of numpy's global RNG


class CorruptionError(InputError):
    """Unknown corruption name, severity outside 1–5, or images the corruptions cannot take."""


def check_corruption(name: str, severity: int) -> None:
    """Raise :class:`CorruptionError` unless ``name`` is one of the 19 and ``severity`` is in 1..5."""
    if name not in CORRUPTIONS:
        import difflib

        close = difflib.get_close_matches(str(name), CORRUPTIONS, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CorruptionError(f"unknown corruption {name!r}{hint}; valid: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= int(severity) <= 5:
        raise CorruptionError(f"corruption severity must be an integer in 1..5, got {severity!r}")


def image_seed(seed: int, name: str, severity: int, index: int) -> int:
    """The 32-bit seed of one image's corruption (stable across runs, machines and batchings)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, CORRUPTIONS.index(name), int(severity), int(index)])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def _library():
    try:
        import imagecorruptions
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise CorruptionError(
            "natural corruptions need imagecorruptions-imaug: pip install 'splitbits[corruptions]'"
        ) from exc
    return imagecorruptions


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0,
            indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Corrupt uint8 N×H×W×3 (or one H×W×3) images; returns uint8 of the same shape.

    Same ``(images, name, severity, seed, indices)`` → same bytes. Sides must be ≥ 32 pixels
    (a limit of the corruption library).
    """
    check_corruption(name, severity)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise CorruptionError("corrupt() takes uint8 images (N×H×W×3 or H×W×3)")
    single = images.ndim == 3
    batch = images[None] if single else images
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise CorruptionError(f"expected uint8 N×H×W×3 images, got shape {images.shape}")
    if batch.shape[1] < 32 or batch.shape[2] < 32:
        raise CorruptionError(f"corruptions need images of at least 32×32 pixels, got {batch.shape[1:3]}")
    n = batch.shape[0]
    idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.shape != (n,):
        raise CorruptionError(f"indices must give one index per image ({n}), got shape {idx.shape}")
    fn = _library().corruption_dict[name]
    out = np.empty_like(batch)
    state = np.random.get_state()
    try:
        for i in range(n):
            s = image_seed(seed, name, int(severity), int(idx[i]))
            np.random.seed(s)
            kwargs = {"seed": s} if name in _SEEDED_KWARG else {}
            from PIL import Image

            res = np.asarray(fn(Image.fromarray(batch[i]), int(severity), **kwargs))
            if res.shape != batch[i].shape:  # a few corruptions return H×W or float arrays
                res = np.broadcast_to(res[..., None] if res.ndim == 2 else res, batch[i].shape)
            out[i] = np.clip(np.asarray(res, dtype=np.float64), 0, 255).astype(np.uint8)
    finally:
        np.random.set_state(state)
    return out[0] if single else out
