"""Input sets for the benchmark runner and the edge client: a dataset, a corruption of it, or a
file of pre-generated (e.g. adversarial) inputs — all numpy, no torch, so they run on a device.

* ``--dataset SPEC [--split val] [--limit N]`` — any ``splitbits.runtime.datasets`` spec;
* ``--attack corruption:NAME:SEVERITY`` — applies ``splitbits.runtime.corruptions.corrupt`` (numpy)
  to the dataset images;
* ``--inputs FILE.npz`` — ``images`` (uint8 N×H×W×3) and optional ``labels``, as written by
  ``splitbits attack ... --save-inputs`` or ``splitbits bench ... --save-inputs``.
"""

from __future__ import annotations

import argparse
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from splitbits.runtime.corruptions import CorruptionError, check_corruption, corrupt
from splitbits.runtime.errors import InputError, SplitbitsError


@dataclass
class InputSet:
    images: np.ndarray  # uint8 N×H×W×3
    labels: np.ndarray  # int64 N (−1 where unknown)
    name: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def parse_attack(spec: str) -> tuple[str, str, int]:
    """``corruption:NAME:SEVERITY`` → ("corruption", NAME, SEVERITY)."""
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != "corruption" or not parts[1]:
        raise InputError(
            f"--attack {spec!r}: expected corruption:NAME:SEVERITY (e.g. corruption:shot_noise:3); "
            "adversarial attacks need torch: run `splitbits attack ... --save-inputs FILE.npz` on a "
            "desktop and pass --inputs FILE.npz here"
        )
    try:
        severity = int(parts[2])
    except ValueError as exc:
        raise InputError(f"--attack {spec!r}: severity must be an integer (1..5)") from exc
    if not 1 <= severity <= 5:
        raise InputError(f"--attack {spec!r}: severity must be 1..5")
    return parts[0], parts[1], severity


def check_attack(spec: str) -> tuple[str, str, int]:
    """:func:`parse_attack` plus the corruption's name and severity."""
    kind, name, severity = parse_attack(spec)
    try:
        check_corruption(name, severity)
    except CorruptionError as exc:
        raise InputError(f"--attack {spec!r}: {exc}") from None
    return kind, name, severity


def apply_corruption(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """:func:`splitbits.runtime.corruptions.corrupt`, its errors as :class:`InputError`."""
    try:
        out = corrupt(images, name, severity, seed=seed)
    except CorruptionError as exc:  # unknown name, bad severity, images it cannot take, library missing
        raise InputError(f"--attack corruption:{name}:{severity}: {exc}") from None
    out = np.asarray(out)
    if out.dtype != np.uint8 or out.shape != images.shape:
        raise SplitbitsError(f"corruption {name} returned {out.dtype} {out.shape}, expected uint8 {images.shape}")
    return out


# Bounds of an --inputs file, checked on the array headers before anything is decompressed.
MAX_INPUT_IMAGES = 1 << 20
MAX_INPUT_BYTES = 8 << 30


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every ``.npy`` member of an npz, read from the headers (nothing decoded)."""
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read is None:
                    raise ValueError(f"{info.filename}: unsupported .npy version {version}")
                shape, _fortran, dtype = read(f)
            out[info.filename[:-4]] = (tuple(shape), dtype)
    return out


def load_npz_inputs(path: str | Path, shape: tuple[int, int, int], limit: int | None = None) -> InputSet:
    """Read ``images``/``labels`` from an npz (no pickles) and check them against the bundle's input:
    headers first (names, dtypes, shapes, sizes), then the arrays. Any problem is an :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--inputs {path}: no such file")
    c, h, w = shape
    try:
        headers = _npz_headers(path)
        if "images" not in headers:
            raise InputError(f"--inputs {path}: no 'images' array (have {sorted(headers)})")
        ishape, idtype = headers["images"]
        if idtype != np.uint8 or len(ishape) != 4 or ishape[1:] != (h, w, c):
            raise InputError(f"--inputs {path}: images must be uint8 N×{h}×{w}×{c} for this bundle, "
                             f"got {idtype} {ishape}")
        if not 1 <= ishape[0] <= MAX_INPUT_IMAGES or ishape[0] * h * w * c > MAX_INPUT_BYTES:
            raise InputError(f"--inputs {path}: {ishape[0]} images; expected 1..{MAX_INPUT_IMAGES} "
                             f"(at most {MAX_INPUT_BYTES >> 30} GiB)")
        if "labels" in headers:
            lshape, ldtype = headers["labels"]
            if ldtype.kind not in "iu" or lshape not in ((ishape[0],), (ishape[0], 1)):
                raise InputError(f"--inputs {path}: labels must be {ishape[0]} integers, got {ldtype} {lshape}")
        small = [k for k, (s_, d) in headers.items()
                 if k not in ("images", "labels") and d.kind in "biufcSU" and int(np.prod(s_)) <= 64]
        with np.load(path, allow_pickle=False) as npz:
            images = npz["images"]
            labels = npz["labels"] if "labels" in headers else None
            meta = {k: npz[k].tolist() for k in small}
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise InputError(f"--inputs {path}: not a readable npz file ({type(exc).__name__}: {exc})") from None
    if images.shape != ishape or images.dtype != np.uint8:  # the data disagrees with its header
        raise InputError(f"--inputs {path}: images array does not match its header")
    if labels is None:
        labels = np.full(images.shape[0], -1, np.int64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise InputError(f"--inputs {path}: {labels.shape[0]} labels for {images.shape[0]} images")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return InputSet(np.ascontiguousarray(images), labels, f"npz:{path.name}", {"inputs_file": str(path), **meta})


def load_inputs(shape: tuple[int, int, int], *, dataset: str = "builtin", split: str = "val",
                limit: int | None = None, attack: str | None = None, inputs: str | Path | None = None,
                seed: int = 0) -> InputSet:
    """The images a run measures (see the module docstring); ``shape`` is the bundle's [C, H, W]."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    parsed_attack = check_attack(attack) if attack else None  # before any image is read
    if inputs is not None:
        if attack:
            raise InputError("--inputs and --attack exclude each other (the file already holds attacked inputs)")
        return load_npz_inputs(inputs, shape, limit)
    from splitbits.runtime.datasets import open_dataset

    _c, h, w = shape
    if h != w:
        raise InputError(f"datasets give square images; this bundle wants {h}×{w}: use --inputs FILE.npz")
    ds = open_dataset(dataset, split=split, image_size=h, limit=limit)
    if len(ds) == 0:
        raise InputError(f"dataset {dataset!r} ({split}) is empty")
    pairs = [ds[i] for i in range(len(ds))]
    images = np.stack([p[0] for p in pairs]).astype(np.uint8, copy=False)
    labels = np.asarray([p[1] for p in pairs], dtype=np.int64)
    name = f"{dataset}:{split}"
    meta: dict[str, Any] = {"dataset": dataset, "split": split, "limit": limit}
    if parsed_attack:
        kind, cname, severity = parsed_attack
        images = apply_corruption(images, cname, severity, seed=seed)
        name = f"{name}+{kind}:{cname}:{severity}"
        meta.update(attack=attack, seed=seed)
    return InputSet(np.ascontiguousarray(images), labels, name, meta)


def inputs_from_args(shape: tuple[int, int, int], args: argparse.Namespace) -> InputSet:
    """:func:`load_inputs` with the options of ``splitbits.runtime.cli.add_input_arguments``."""
    return load_inputs(shape, dataset=args.dataset, split=args.split, limit=args.limit, attack=args.attack,
                       inputs=args.inputs, seed=args.seed)


def save_inputs(path: str | Path, inputs: InputSet) -> Path:
    """Write an input set as npz (``images``, ``labels``) for ``--inputs`` on another machine."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=inputs.images, labels=inputs.labels)
    return path
