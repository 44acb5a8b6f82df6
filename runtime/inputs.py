"""Input sets for the benchmark runner and the edge client: a dataset, a corruption of it, or a
file of pre-generated (e.g. adversarial) inputs — all numpy, no torch, so they run on a device.

* ``--dataset SPEC [--split val] [--limit N]`` — any ``splitbits.runtime.datasets`` spec;
* ``--attack corruption:NAME:SEVERITY`` — applies ``splitbits.attacks.corruptions.corrupt`` (numpy)
  to the dataset images;
* ``--inputs FILE.npz`` — ``images`` (uint8 N×H×W×3) and optional ``labels``, as written by
  ``splitbits attack ... --save-inputs`` or ``splitbits bench ... --save-inputs``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


def apply_corruption(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``splitbits.attacks.corruptions.corrupt`` imported on demand, with a clear error if absent."""
    try:
        from splitbits.attacks.corruptions import corrupt
    except ImportError as exc:
        raise SplitbitsError(
            f"--attack corruption:{name}:{severity} needs splitbits.attacks.corruptions, which is not "
            f"available in this installation ({exc}); pre-generate the inputs elsewhere and pass --inputs FILE.npz"
        ) from exc
    out = corrupt(images, name, severity, seed=seed)
    out = np.asarray(out)
    if out.dtype != np.uint8 or out.shape != images.shape:
        raise SplitbitsError(f"corruption {name} returned {out.dtype} {out.shape}, expected uint8 {images.shape}")
    return out


def load_npz_inputs(path: str | Path, shape: tuple[int, int, int], limit: int | None = None) -> InputSet:
    """Read ``images``/``labels`` from an npz (no pickles) and check them against the bundle's input."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--inputs {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz.files:
                raise InputError(f"--inputs {path}: no 'images' array (have {npz.files})")
            images = npz["images"]
            labels = npz["labels"] if "labels" in npz.files else None
            meta = {k: npz[k].tolist() for k in npz.files if k not in ("images", "labels") and npz[k].size <= 64}
    except (OSError, ValueError) as exc:
        raise InputError(f"--inputs {path}: unreadable ({exc})") from exc
    c, h, w = shape
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (h, w, c):
        raise InputError(f"--inputs {path}: images must be uint8 N×{h}×{w}×{c} for this bundle, "
                         f"got {images.dtype} {images.shape}")
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
    if attack:
        kind, cname, severity = parse_attack(attack)
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
