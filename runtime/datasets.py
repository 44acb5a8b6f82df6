"""Image datasets for training, evaluation and the on-device runner (numpy + Pillow only, never torch).

``open_dataset(spec, split="val", image_size=None, limit=None)`` returns an :class:`ImageDataset`:
``len(ds)``, ``ds[i] -> (uint8 H×W×3 array, int label)``, ``ds.classes`` (folder names / ids),
``ds.class_names`` (human-readable), ``ds.name``, ``ds.meta(i)``.

Dataset specs
-------------
``builtin`` / ``builtin:seed=N[&train=N_TRAIN][&val=N_VAL]``
    Generated locally, deterministically, without any download: 12 classes of procedurally drawn
    shapes (random colour, two-tone texture, size, aspect, rotation, position, optional drop shadow)
    composited onto crops of natural photographs (a cat, an astronaut, coffee, a rocket launch,
    micrographs, a retina, textures, coins, ...). 14 photographs ship inside splitbits
    (``runtime/builtin_photos/``, with their licences); two more (``moon.png``,
    ``motorcycle_left.png``, licence undocumented, not shipped) are read from scikit-image's package
    data when scikit-image is installed. All are read as files with Pillow; scikit-image is never
    imported. ``train`` (6000 images by default) and ``val`` (1200) use different random streams *and*
    disjoint regions of every photograph (train: left 70 %, val: right 30 %). Labels are
    ``i % 12`` (balanced). 64×64 unless ``image_size`` says otherwise; any size works: a background
    is a 1-4× box-downsampled crop where the photograph's region holds one (sizes up to ~115 always),
    else a square crop of 75-100 % of the largest one the region holds, upsampled by exact integer
    bilinear interpolation (at 224: train crops are all 1:1; val crops of 14 of the 16 photographs
    are upsampled 1.0-2.6×, so they are softer than real 224-px photos). Only integer
    RNG draws, IEEE arithmetic and scalar ``math.cos/sin`` are used, so the bytes are identical across
    runs and machines for a given set of background files (their hash is part of :attr:`fingerprint`:
    with scikit-image installed the set is the 16 photographs of every earlier release and the images
    are byte-identical to them; without it, 14, a different fingerprinted dataset).
    The full splits are cached under ``$SPLITBITS_CACHE`` (default ``~/.cache/splitbits``)/datasets.
``imagefolder:PATH``
    ImageNet layout ``PATH/<split>/<class>/*.JPEG``, or ``PATH/<class>/*`` when ``PATH`` has no
    split folders (then every split reads the same images). Images are resized (shorter side to
    ``image_size·256/224``, bilinear) and center-cropped to ``image_size`` (default 224);
    ``raw=True`` returns decoded images untouched (the trainer's train augmentation starts there).
    Files are hostile input: an image declaring more than 64 megapixels is refused before it is
    decoded, as is an undecodable one (a :class:`DatasetError` naming the file); 16-bit greyscale is
    scaled to 8 bits (value/257, rounded), 32-bit float images (mode ``F``) are refused.
``imagenet-c:PATH[?corruption=NAME[,NAME...]&severity=S[,S...]]``
    The ImageNet-C layout ``PATH/<corruption>/<severity>/<class>/*``. Without a selection every
    corruption and severity is read; e.g. ``imagenet-c:/data/IN-C?corruption=gaussian_noise&severity=3``.
    ``meta(i)`` gives the corruption and severity of item ``i``. Only the ``val`` (or ``test``) split.

A ``limit`` keeps the first ``limit`` items; folder datasets are ordered round-robin over classes
(and corruption/severity groups), so a limited subset is class-balanced.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from splitbits.runtime.errors import SplitbitsError

__all__ = [
    "BUILTIN_CLASSES",
    "BuiltinDataset",
    "DatasetError",
    "ImageDataset",
    "ImageFolderDataset",
    "ImageNetCDataset",
    "jpeg_size",
    "load_arrays",
    "mean_jpeg_bytes",
    "open_dataset",
    "photo_paths",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


class DatasetError(SplitbitsError, ValueError):
    """A dataset spec that cannot be opened: unknown scheme, missing path, bad split, no images."""


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


class ImageDataset(Sequence):
    """A labelled image collection: ``ds[i] -> (uint8 H×W×3 ndarray, int label)``."""

    name: str
    split: str
    classes: list[str]
    class_names: list[str]
    image_size: int | None  # side of every (square) image; None for raw variable-size images

    def __len__(self) -> int:
        raise NotImplementedError

    def _get(self, i: int) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("ImageDataset indexes one item at a time")
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} ({n} items)")
        return self._get(i)

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for i in range(len(self)):
            yield self._get(i)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def labels(self) -> np.ndarray:
        """All labels (int64), without decoding images."""
        return np.array([self._label(i) for i in range(len(self))], dtype=np.int64)

    def _label(self, i: int) -> int:
        return self._get(i)[1]

    def meta(self, i: int) -> dict[str, Any]:
        """Per-item metadata (e.g. source file, corruption and severity)."""
        return {}

    def as_array(self) -> np.ndarray:
        """All images as one uint8 N×H×W×3 array (square datasets: give ``image_size``)."""
        if len(self) == 0:
            return np.zeros((0, 0, 0, 3), np.uint8)
        return np.stack([self._get(i)[0] for i in range(len(self))]).astype(np.uint8, copy=False)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} split={self.split} n={len(self)} classes={self.num_classes}>"


# --------------------------------------------------------------------------------------------
# builtin: procedurally drawn shapes on natural-photo backgrounds
# --------------------------------------------------------------------------------------------

GENERATOR_VERSION = 1
BUILTIN_CLASSES = [
    "circle", "ring", "square", "frame", "triangle", "star",
    "cross", "hexagon", "crescent", "arrow", "heart", "ell",
]
BUILTIN_SIZES = {"train": 6000, "val": 1200}
BUILTIN_DEFAULT_SEED = 0
_SPLIT_STREAM = {"train": 1, "val": 2}
_VAL_REGION = 0.7  # photographs: columns [0, 0.7W) feed train, [0.7W, W) feed val

# Background photographs, in this order (the order is part of the generated bytes). 14 of them ship
# inside splitbits (runtime/builtin_photos/, byte-identical copies of scikit-image's package data,
# all CC0 / public domain / no known restrictions: see the README there); moon.png and
# motorcycle_left.png have no documented licence, so they are not shipped and are read from an
# installed scikit-image's data folder when there is one (as files; ``skimage`` is never imported).
# Missing files are skipped; at least 4 are needed. Grayscale ones get a random tint.
_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "ihc.png", "motorcycle_left.png", "rocket.jpg",
    "hubble_deep_field.jpg", "retina.jpg", "brick.png", "grass.png", "gravel.png", "camera.png",
    "moon.png", "coins.png", "cell.png", "clock_motion.png",
)
_SHIPPED_PHOTOS = Path(__file__).resolve().parent / "builtin_photos"


def _skimage_data_dir() -> Path | None:
    """scikit-image's package data folder, located without importing scikit-image (None if absent)."""
    try:
        spec = importlib.util.find_spec("skimage")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "data"


def photo_paths() -> list[Path]:
    """The builtin's background photographs found, in :data:`_PHOTOS` order: the shipped copy first, else
    scikit-image's (16 with scikit-image installed, 14 without)."""
    dirs = [_SHIPPED_PHOTOS]
    extra = _skimage_data_dir()
    if extra is not None:
        dirs.append(extra)
    found = []
    for name in _PHOTOS:
        path = next((d / name for d in dirs if (d / name).is_file()), None)
        if path is not None:
            found.append(path)
    return found


@dataclass(frozen=True)
class _Photo:
    name: str
    pixels: np.ndarray  # float64 H×W×3 in [0, 255]
    gray: bool


@lru_cache(maxsize=1)
def _load_photos() -> tuple[tuple[_Photo, ...], str]:
    """Decode the background photographs once per process; returns (photos, sha256 of their files)."""
    from PIL import Image

    photos, h = [], hashlib.sha256()
    for path in photo_paths():
        data = path.read_bytes()
        h.update(path.name.encode() + b"\0" + hashlib.sha256(data).digest())
        with Image.open(io.BytesIO(data)) as im:
            gray = im.mode in ("L", "I", "I;16", "1")
            arr = np.asarray(im.convert("RGB"), dtype=np.float64)
        photos.append(_Photo(path.name, arr, gray))
    if len(photos) < 4:
        raise DatasetError(
            f"the builtin dataset needs its background photographs in {_SHIPPED_PHOTOS} "
            f"(found {len(photos)} of {len(_PHOTOS)}); reinstall splitbits"
        )
    return tuple(photos), h.hexdigest()


def _cos_sin(angle: float) -> tuple[float, float]:
    # Scalar libm results rounded to 12 decimals: identical on every platform in practice.
    return round(math.cos(angle), 12), round(math.sin(angle), 12)


def _polygon_mask(u: np.ndarray, v: np.ndarray, pts: Sequence[tuple[float, float]]) -> np.ndarray:
    """Even-odd crossing test of points (u, v) against a closed polygon."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(pts)
    for k in range(n):
        x1, y1 = pts[k]
        x2, y2 = pts[(k + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        xint = (x2 - x1) * (v - y1) / (y2 - y1) + x1
        inside ^= crosses & (u < xint)
    return inside


def _regular(n: int, r: float = 1.0, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(r * c, r * s) for c, s in (_cos_sin(phase + 2 * math.pi * k / n) for k in range(n))]


@cache
def _shape_polygons() -> dict[str, list[tuple[float, float]]]:
    star = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.42
        c, s = _cos_sin(-math.pi / 2 + math.pi * k / 5)
        star.append((r * c, r * s))
    a, b = 0.3, 0.9
    return {
        "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
        "triangle": _regular(3, 1.05, -math.pi / 2),
        "star": star,
        "cross": [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
                  (-b, a), (-b, -a), (-a, -a)],
        "hexagon": _regular(6, 0.95),
        "arrow": [(-0.95, -0.25), (0.15, -0.25), (0.15, -0.7), (0.95, 0.0), (0.15, 0.7), (0.15, 0.25),
                  (-0.95, 0.25)],
        "ell": [(-0.7, -0.9), (-0.2, -0.9), (-0.2, 0.4), (0.7, 0.4), (0.7, 0.9), (-0.7, 0.9)],
    }


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of (u, v) in the unit-sized ``shape`` (all shapes fit in [-1, 1]²)."""
    r2 = u * u + v * v
    if shape == "circle":
        return r2 <= 0.9
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.36)
    if shape == "frame":
        m = np.maximum(np.abs(u), np.abs(v))
        return (m <= 0.85) & (m >= 0.5)
    if shape == "crescent":
        return (r2 <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.64)
    if shape == "heart":
        x, y = u * 1.2, -v * 1.2 + 0.25
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    return _polygon_mask(u, v, _shape_polygons()[shape])


def _downsample(a: np.ndarray, k: int) -> np.ndarray:
    """Box-filter ``a`` (H×W[×C]) by an integer factor with a fixed summation order."""
    if k == 1:
        return a
    acc = np.zeros((a.shape[0] // k, a.shape[1] // k, *a.shape[2:]), dtype=np.float64)
    for dy in range(k):
        for dx in range(k):
            acc += a[dy::k, dx::k]
    return acc / float(k * k)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float64)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _upsample_axis(side: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps from ``side`` to ``size`` > ``side`` samples (pixel centres aligned, edges
    replicated), in integers: output i = (a[lo]·(D − f) + a[hi]·f) / D with D = 2·size."""
    den = 2 * size
    num = (2 * np.arange(size, dtype=np.int64) + 1) * side - size  # source centre × D
    lo = num // den
    frac = num - lo * den
    frac[lo < 0] = 0
    lo = np.clip(lo, 0, side - 1)
    hi = np.minimum(lo + 1, side - 1)
    return lo, hi, frac


def _upsample(a: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a square H×H×C array of integers to size×size, exactly: every sum is an
    integer below 2^53 and there is one division at the end, so the result is the same everywhere."""
    side, den = a.shape[0], 2 * size
    lo, hi, f = _upsample_axis(side, size)
    w_lo, w_hi = (den - f)[:, None, None], f[:, None, None]
    rows = a[lo] * w_lo + a[hi] * w_hi  # size × side × C
    cols = rows[:, lo] * w_lo.reshape(1, -1, 1) + rows[:, hi] * w_hi.reshape(1, -1, 1)
    return cols / float(den * den)


def _background(rng: np.random.Generator, photos: Sequence[_Photo], split: str, size: int) -> np.ndarray:
    """A size×size crop of a random photograph (split-disjoint region), jittered: box-downsampled by
    1-4 when the region holds such a crop (every size up to ~115, e.g. the default 64), else a square
    of 75-100 % of the largest one the region holds, upsampled bilinearly (e.g. 224 from ~154 px)."""
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.pixels.shape[:2]
    cut = int(w * _VAL_REGION)
    x_lo, x_hi = (0, cut) if split == "train" else (cut, w)
    largest = min(h, x_hi - x_lo)
    ks = [k for k in (1, 2, 3, 4) if k * size <= largest]
    if ks:
        k = ks[int(rng.integers(len(ks)))]
        side = k * size
    else:
        side = int(rng.integers((3 * largest + 3) // 4, largest + 1))
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(x_lo, x_hi - side + 1))
    crop = photo.pixels[y0:y0 + side, x0:x0 + side]
    bg = _downsample(crop, k) if ks else _upsample(crop, size)
    if rng.integers(2):
        bg = bg[:, ::-1]
    if photo.gray:
        tint = 0.45 + rng.integers(0, 56, size=3) / 100.0
        bg = bg * tint
    else:
        bg = bg * (0.85 + rng.integers(0, 31, size=3) / 100.0)
    gain = 0.7 + rng.integers(0, 46) / 100.0
    return np.clip(bg * gain, 0.0, 255.0)


def _texture(rng: np.random.Generator, photos: Sequence[_Photo], split: str, x: np.ndarray,
             y: np.ndarray) -> np.ndarray:
    """A [0, 1] texture on the pixel grid (x, y): flat, stripes, checker, ramp or photo detail."""
    kind = int(rng.integers(5))
    size = x.shape[0]
    if kind == 0:
        return np.ones_like(x)
    if kind in (1, 2, 3):
        c, s = _cos_sin(rng.integers(0, 360) * math.pi / 180)
        period = 3.0 + rng.integers(0, 70) / 10.0
        if kind == 1:  # stripes (triangle wave)
            t = (x * c + y * s) / period
            return np.abs(2.0 * (t - np.floor(t)) - 1.0)
        if kind == 2:  # checker
            a = np.floor((x * c + y * s) / period)
            b = np.floor((-x * s + y * c) / period)
            return np.mod(a + b, 2.0)
        t = (x * c + y * s) / size  # ramp
        return (t - t.min()) / max(float(t.max() - t.min()), 1e-9)
    tex = _luma(_background(rng, photos, split, size))
    lo, hi = float(tex.min()), float(tex.max())
    return (tex - lo) / max(hi - lo, 1.0)


def _render_builtin(seed: int, split: str, index: int, size: int) -> np.ndarray:
    """Draw item ``index`` of a builtin split (label ``index % 12``)."""
    photos, _ = _load_photos()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SPLIT_STREAM[split], index])))
    shape = BUILTIN_CLASSES[index % len(BUILTIN_CLASSES)]
    bg = _background(rng, photos, split, size)

    ss = 2  # supersampling for anti-aliased edges
    g = (np.arange(size * ss, dtype=np.float64) + 0.5) / ss
    gy, gx = np.meshgrid(g, g, indexing="ij")
    radius = size * (0.26 + rng.integers(0, 19) / 100.0)
    margin = radius * 0.8
    cx = margin + rng.integers(0, 1001) / 1000.0 * (size - 2 * margin)
    cy = margin + rng.integers(0, 1001) / 1000.0 * (size - 2 * margin)
    c, s = _cos_sin(rng.integers(0, 360) * math.pi / 180)
    aspect = 0.85 + rng.integers(0, 31) / 100.0

    def coverage(dx: float, dy: float) -> np.ndarray:
        px, py = gx - cx - dx, gy - cy - dy
        u = (px * c + py * s) / (radius * aspect)
        v = (-px * s + py * c) / (radius / aspect)
        return _downsample(_shape_mask(shape, u, v).astype(np.float64), ss)

    alpha = coverage(0.0, 0.0)
    if rng.integers(2):  # drop shadow
        d = 1.0 + rng.integers(0, 3)
        shadow = coverage(d, d) * (0.35 + rng.integers(0, 26) / 100.0)
        bg = bg * (1.0 - shadow)[..., None]

    px = np.arange(size, dtype=np.float64) + 0.5
    py, pxx = np.meshgrid(px, px, indexing="ij")
    tex = _texture(rng, photos, split, pxx, py)[..., None]
    # Main colour: the most contrasting of three candidates against the background under the shape.
    bg_luma = float((_luma(bg) * alpha).sum() / max(float(alpha.sum()), 1.0))
    candidates = [_random_colour(rng) for _ in range(3)]
    main = max(candidates, key=lambda col: abs(float(_luma(col)) - bg_luma))
    second = main * (0.35 + rng.integers(0, 41) / 100.0) + _random_colour(rng) * 0.25
    fill = main * tex + second * (1.0 - tex)
    opacity = 0.85 + rng.integers(0, 16) / 100.0
    a = (alpha * opacity)[..., None]
    img = bg * (1.0 - a) + fill * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _cache_dir() -> Path:
    root = os.environ.get("SPLITBITS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "splitbits"
    )
    return Path(root) / "datasets"


class BuiltinDataset(ImageDataset):
    """The generated shapes-on-photographs dataset (see the module docstring)."""

    def __init__(self, seed: int = BUILTIN_DEFAULT_SEED, split: str = "val", image_size: int | None = None,
                 limit: int | None = None, size: int | None = None, cache: bool = True) -> None:
        if split not in _SPLIT_STREAM:
            raise DatasetError(f"builtin has splits train and val, not {split!r}")
        image_size = 64 if image_size is None else int(image_size)
        if image_size < 16:
            raise DatasetError(f"builtin image_size must be at least 16, got {image_size}")
        full = BUILTIN_SIZES[split] if size is None else int(size)
        if full < 1:
            raise DatasetError(f"builtin {split} size must be positive, got {full}")
        self.seed, self.split, self.image_size = int(seed), split, image_size
        self.full_size = full
        self._n = full if limit is None else max(0, min(full, int(limit)))
        if self._n == 0:
            raise DatasetError("builtin: limit leaves no images")
        self.classes = list(BUILTIN_CLASSES)
        self.class_names = list(BUILTIN_CLASSES)
        self.name = f"builtin:seed={self.seed}"
        _, bg_hash = _load_photos()
        key = f"v{GENERATOR_VERSION}-seed{self.seed}-{split}-{full}-{image_size}-{bg_hash[:16]}"
        self.fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
        self._cache_path = _cache_dir() / f"builtin-{key}.npy"
        self._images: np.ndarray | None = None
        if cache and self._cache_path.is_file():
            try:
                arr = np.load(self._cache_path, mmap_mode="r")
                if arr.shape == (full, image_size, image_size, 3) and arr.dtype == np.uint8:
                    self._images = arr
            except (OSError, ValueError):
                self._images = None
        if self._images is None and cache and self._n == full:
            self._images = self._materialize()

    def _materialize(self) -> np.ndarray:
        """Draw the whole split and write it to the cache atomically (best effort)."""
        arr = np.empty((self.full_size, self.image_size, self.image_size, 3), dtype=np.uint8)
        for i in range(self.full_size):
            arr[i] = _render_builtin(self.seed, self.split, i, self.image_size)
        try:
            self._cache_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._cache_path.parent, prefix=self._cache_path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, arr)
                os.replace(tmp, self._cache_path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError:
            pass  # a read-only cache is not an error: the data is regenerated next time
        return arr

    def __len__(self) -> int:
        return self._n

    def _label(self, i: int) -> int:
        return i % len(BUILTIN_CLASSES)

    def labels(self) -> np.ndarray:
        return np.arange(self._n, dtype=np.int64) % len(BUILTIN_CLASSES)

    def _get(self, i: int) -> tuple[np.ndarray, int]:
        if self._images is not None:
            img = np.array(self._images[i])
        else:
            img = _render_builtin(self.seed, self.split, i, self.image_size)
        return img, self._label(i)

    def as_array(self) -> np.ndarray:
        """All images as one uint8 N×H×W×3 array (memory-mapped from the cache when possible)."""
        if self._images is not None:
            return self._images[: self._n]
        return super().as_array()

    def meta(self, i: int) -> dict[str, Any]:
        return {"index": i, "shape": self.classes[self._label(i)]}


# --------------------------------------------------------------------------------------------
# Folder datasets (ImageNet, ImageNet-C)
# --------------------------------------------------------------------------------------------


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()


def _subdirs(p: Path) -> list[Path]:
    return sorted((d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _round_robin(buckets: Sequence[Sequence[Any]]) -> list[Any]:
    out: list[Any] = []
    longest = max((len(b) for b in buckets), default=0)
    for j in range(longest):
        out.extend(b[j] for b in buckets if j < len(b))
    return out


def _read_class_names(root: Path, classes: list[str]) -> list[str]:
    """Human names from a synset mapping file (``wnid name, alias``) next to the data, if any."""
    for cand in (root / "LOC_synset_mapping.txt", root / "synset_words.txt", root / "class_names.txt",
                 root.parent / "LOC_synset_mapping.txt"):
        if cand.is_file():
            mapping = {}
            for line in cand.read_text(errors="replace").splitlines():
                wnid, _, rest = line.strip().partition(" ")
                if wnid and rest:
                    mapping[wnid] = rest.split(",")[0].strip()
            return [mapping.get(c, c) for c in classes]
    return list(classes)


# Decoded images are bounded before any pixel is decoded (a 271-byte PNG can declare 65000×1 or
# 15000×15000 pixels); Pillow's own decompression-bomb limit is higher and only a warning below it.
MAX_IMAGE_PIXELS = 64_000_000


def _open_bounded(path: Path):  # -> PIL.Image.Image
    """``Image.open`` with the pixel bound checked on the header, before decoding."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DatasetError(f"image {path}: too many pixels, refused before decoding ({exc})") from None
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS or w < 1 or h < 1:
        im.close()
        raise DatasetError(f"image {path}: {w}×{h} pixels ({w * h / 1e6:.0f} megapixels); "
                           f"the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels")
    return im


def _to_rgb8(im, path: Path):  # PIL.Image.Image -> PIL.Image.Image
    """8-bit RGB. 16-bit greyscale (modes ``I;16*``, and ``I`` holding 0..65535) is scaled to 8 bits
    (value/257, rounded), not clipped; 32-bit float images (mode ``F``) and ``I`` values outside
    0..65535 are refused: their range is not known. Alpha is dropped, palettes are expanded."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im)
        if a.dtype.kind == "i" and a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise DatasetError(f"image {path}: 32-bit integer pixels outside 0..65535 "
                               f"({int(a.min())}..{int(a.max())}); convert it to 8 or 16 bits")
        a8 = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)  # = round(v / 257), exactly
        return Image.fromarray(a8, "L").convert("RGB")
    if im.mode == "F":
        raise DatasetError(f"image {path}: 32-bit float pixels (mode F) have no known range; "
                           "convert it to an 8- or 16-bit image")
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise DatasetError(f"image {path}: cannot convert mode {im.mode} to RGB ({exc})") from None


def _resize_center_crop(im, image_size: int):  # PIL.Image.Image -> PIL.Image.Image
    """The ImageNet evaluation transform: resize the shorter side to size·256/224 (bilinear), then
    center-crop size×size. Done in one ``resize(box=...)`` of the crop's source rectangle, so the
    intermediate is never larger than the output (a 65000×1 image would otherwise be resized to
    4.7M×73 first); the numbers are those of resize-then-crop."""
    from PIL import Image

    w, h = im.size
    if w == h == image_size:
        return im
    if w == h and w <= round(image_size * 256 / 224):
        return im.resize((image_size, image_size), Image.BILINEAR)  # already center-cropped
    short = round(image_size * 256 / 224)
    nw, nh = (short, max(short, round(h * short / w))) if w <= h else (max(short, round(w * short / h)), short)
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    sx, sy = w / nw, h / nh  # source pixels per resized pixel
    box = (left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy)
    return im.resize((image_size, image_size), Image.BILINEAR, box=box)


def _load_image(path: Path, image_size: int | None) -> np.ndarray:
    """Decode to 8-bit RGB (see :func:`_to_rgb8`); with ``image_size``: resize shorter side to
    size·256/224, center-crop size (:func:`_resize_center_crop`). Images over
    :data:`MAX_IMAGE_PIXELS` and undecodable files are a :class:`DatasetError` naming the file."""
    try:
        im = _open_bounded(path)
    except DatasetError:
        raise
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None
    with im:
        try:
            im.load()
        except Exception as exc:  # hostile bytes: decoders raise OSError, ValueError, SyntaxError, ...
            raise DatasetError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None
        rgb = _to_rgb8(im, path)
        if image_size is not None:
            rgb = _resize_center_crop(rgb, image_size)
        return np.asarray(rgb, dtype=np.uint8).copy()


class _FolderDataset(ImageDataset):
    def __init__(self, samples: list[tuple[Path, int, dict[str, Any]]], image_size: int | None,
                 limit: int | None) -> None:
        if limit is not None:
            samples = samples[: max(0, int(limit))]
        if not samples:
            raise DatasetError(f"{self.name}: no images found")
        self._samples = samples
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self._samples)

    def _label(self, i: int) -> int:
        return self._samples[i][1]

    def labels(self) -> np.ndarray:
        return np.array([s[1] for s in self._samples], dtype=np.int64)

    def _get(self, i: int) -> tuple[np.ndarray, int]:
        path, label, _ = self._samples[i]
        return _load_image(path, self.image_size), label

    def meta(self, i: int) -> dict[str, Any]:
        path, _, extra = self._samples[i]
        return {"path": str(path), **extra}


def _list_class_images(base: Path, classes: list[str], class_index: dict[str, int],
                       extra: dict[str, Any]) -> list[list[tuple[Path, int, dict[str, Any]]]]:
    buckets = []
    for cname in classes:
        d = base / cname
        if not d.is_dir():
            continue
        files = sorted((p for p in d.iterdir() if _is_image(p)), key=lambda p: p.name)
        buckets.append([(p, class_index[cname], extra) for p in files])
    return buckets


class ImageFolderDataset(_FolderDataset):
    """``PATH/<split>/<class>/*`` (or ``PATH/<class>/*``), ImageNet-style eval preprocessing."""

    def __init__(self, root: str | os.PathLike, split: str = "val", image_size: int | None = None,
                 limit: int | None = None, raw: bool = False) -> None:
        root = Path(root).expanduser()
        self.name, self.split, self.root = f"imagefolder:{root}", split, root
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        if not root.is_dir():
            raise DatasetError(f"imagefolder: path not found or not a directory: {root}")
        present = [s for s in SPLITS if (root / s).is_dir()]
        if (root / split).is_dir():
            base = root / split
        elif present:
            raise DatasetError(f"imagefolder: {root} has no {split!r} split (it has: {', '.join(present)})")
        else:
            base = root
        self.classes = [d.name for d in _subdirs(base)]
        if not self.classes:
            raise DatasetError(f"imagefolder: no class folders in {base}")
        self.class_names = _read_class_names(root, self.classes)
        index = {c: k for k, c in enumerate(self.classes)}
        samples = _round_robin(_list_class_images(base, self.classes, index, {}))
        size = None if raw else (224 if image_size is None else int(image_size))
        super().__init__(samples, size, limit)


_IMAGENET_C_KEYS = ("corruption", "severity")


class ImageNetCDataset(_FolderDataset):
    """``PATH/<corruption>/<severity>/<class>/*``, optionally restricted to some corruptions/severities."""

    def __init__(self, root: str | os.PathLike, split: str = "val", image_size: int | None = None,
                 limit: int | None = None, corruptions: Sequence[str] | None = None,
                 severities: Sequence[int] | None = None, raw: bool = False) -> None:
        root = Path(root).expanduser()
        self.name, self.split, self.root = f"imagenet-c:{root}", split, root
        if split not in ("val", "test"):
            raise DatasetError(f"imagenet-c has only evaluation images (split val), not {split!r}")
        if not root.is_dir():
            raise DatasetError(f"imagenet-c: path not found or not a directory: {root}")
        available = [d.name for d in _subdirs(root)]
        if not available:
            raise DatasetError(f"imagenet-c: no corruption folders in {root}")
        chosen = list(corruptions) if corruptions else available
        for c in chosen:
            if c not in available:
                raise DatasetError(f"imagenet-c: no corruption {c!r} in {root} (has: {', '.join(available)})")
        groups: list[tuple[str, int, Path]] = []
        for c in chosen:
            sev_dirs = {d.name: d for d in _subdirs(root / c) if d.name.isdigit()}
            sevs = [int(s) for s in sorted(sev_dirs, key=int)] if not severities else list(severities)
            for s in sevs:
                if str(s) not in sev_dirs:
                    raise DatasetError(f"imagenet-c: {c} has no severity {s} (has: {', '.join(sorted(sev_dirs))})")
                groups.append((c, s, sev_dirs[str(s)]))
        if not groups:
            raise DatasetError(f"imagenet-c: no severity folders under {root}")
        self.corruptions = sorted({g[0] for g in groups})
        self.severities = sorted({g[1] for g in groups})
        self.classes = sorted({d.name for _, _, gdir in groups for d in _subdirs(gdir)})
        if not self.classes:
            raise DatasetError(f"imagenet-c: no class folders under {root}")
        self.class_names = _read_class_names(root, self.classes)
        index = {c: k for k, c in enumerate(self.classes)}
        buckets = []
        for c, s, gdir in groups:
            buckets.extend(_list_class_images(gdir, self.classes, index, {"corruption": c, "severity": s}))
        samples = _round_robin(buckets)
        super().__init__(samples, None if raw else (224 if image_size is None else int(image_size)), limit)


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


def _parse_params(text: str, scheme: str, allowed: Sequence[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for part in text.replace(",", "&").split("&") if scheme == "builtin" else text.split("&"):
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not value.strip():
            raise DatasetError(f"{scheme}: expected key=value, got {part!r}")
        if key not in allowed:
            raise DatasetError(f"{scheme}: unknown option {key!r} (allowed: {', '.join(allowed)})")
        params[key] = value.strip()
    return params


def _int_param(scheme: str, key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{scheme}: {key} must be an integer, got {value!r}") from None


def open_dataset(spec: str, split: str = "val", image_size: int | None = None, limit: int | None = None,
                 *, raw: bool = False) -> ImageDataset:
    """Open ``builtin[:seed=N]``, ``imagefolder:PATH`` or ``imagenet-c:PATH[?corruption=..&severity=..]``.

    ``raw=True`` (folder datasets only) skips resizing/cropping so a trainer can augment from the
    full image. Raises :class:`DatasetError` on anything that cannot be opened.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError("empty dataset spec; use builtin, imagefolder:PATH or imagenet-c:PATH")
    if limit is not None and int(limit) < 1:
        raise DatasetError(f"limit must be positive, got {limit}")
    if image_size is not None and int(image_size) < 1:
        raise DatasetError(f"image_size must be positive, got {image_size}")
    scheme, _, rest = spec.strip().partition(":")
    scheme = scheme.lower()
    if scheme == "builtin":
        params = _parse_params(rest, scheme, ("seed", "train", "val"))
        seed = _int_param(scheme, "seed", params.get("seed", str(BUILTIN_DEFAULT_SEED)))
        size = _int_param(scheme, split, params[split]) if split in params else None
        return BuiltinDataset(seed=seed, split=split, image_size=image_size, limit=limit, size=size)
    if scheme in ("imagefolder", "imagenet-c"):
        if not rest:
            raise DatasetError(f"{scheme}: give a path, e.g. {scheme}:/data/imagenet")
        if scheme == "imagefolder":
            return ImageFolderDataset(rest, split, image_size, limit, raw=raw)
        path, query = rest, ""
        if "?" in rest:
            path, _, query = rest.rpartition("?")
        params = _parse_params(query, scheme, _IMAGENET_C_KEYS)
        corr = [c for c in params.get("corruption", "").split(",") if c] or None
        sev = [_int_param(scheme, "severity", s) for s in params.get("severity", "").split(",") if s] or None
        if sev and any(not 1 <= s <= 5 for s in sev):
            raise DatasetError(f"imagenet-c: severities are 1..5, got {sev}")
        return ImageNetCDataset(path, split, image_size, limit, corruptions=corr, severities=sev, raw=raw)
    raise DatasetError(
        f"unknown dataset scheme {scheme!r} in {spec!r}; use builtin[:seed=N], imagefolder:PATH "
        "or imagenet-c:PATH[?corruption=NAME&severity=N]"
    )


# --------------------------------------------------------------------------------------------
# JPEG reference sizes
# --------------------------------------------------------------------------------------------


def load_arrays(spec: str, split: str = "val", image_size: int | None = None, limit: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """``open_dataset`` as arrays: (uint8 N×H×W×3 images, int64 labels); an empty dataset is a
    :class:`DatasetError`."""
    ds = open_dataset(spec, split=split, image_size=image_size, limit=limit)
    if len(ds) == 0:
        raise DatasetError(f"dataset {spec!r} ({split}) has no images")
    return np.ascontiguousarray(ds.as_array()), ds.labels()


def jpeg_size(image: np.ndarray, quality: int = 75) -> int:
    """Bytes of ``image`` (uint8 H×W×3) encoded by Pillow as baseline JPEG at ``quality``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.tell()


def mean_jpeg_bytes(ds: ImageDataset, quality: int = 75, limit: int | None = None) -> float:
    """Mean JPEG size in bytes over the first ``limit`` (default all) images of ``ds``."""
    n = len(ds) if limit is None else min(len(ds), limit)
    return float(np.mean([jpeg_size(ds[i][0], quality) for i in range(n)]))
