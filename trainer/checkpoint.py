"""Checkpoints: the model's state dict plus the spec, config and metrics that produced it.

Format (a ``torch.save`` dict): ``{"format": "splitbits-ckpt", "version": 1, "kind": "teacher" | "student",
"spec": ModelSpec dict, "model": state_dict, "config": dict, "metrics": dict, "train_state": dict | None}``.
``train_state`` (optimizer, scheduler, epoch, stage, RNG) makes training resumable.
sc2bench / torchdistill checkpoints (``{"model": state_dict}`` or a bare state dict) load through
:func:`load_model` when a ``spec`` is given.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitbits.trainer.models import ModelSpec, SplitClassifier, build_model, load_sc2bench_checkpoint

FORMAT = "splitbits-ckpt"
VERSION = 1


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    spec: ModelSpec,
    *,
    kind: str,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write atomically (temp file + rename) so an interrupted save never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = model.module if hasattr(model, "module") else model  # unwrap DDP
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "spec": spec.to_dict(),
        "model": module.state_dict(),
        "config": config or {},
        "metrics": metrics or {},
        "train_state": train_state,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load the raw checkpoint dict; raises ``ValueError`` with the path on anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many kinds on a corrupt file
        raise ValueError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def load_model(path: str | os.PathLike, spec: ModelSpec | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint (eval mode, CPU). Returns ``(model, checkpoint_dict)``.

    A splitbits checkpoint carries its own spec; an sc2bench checkpoint needs ``spec``.
    """
    obj = read_checkpoint(path)
    if obj.get("format") == FORMAT:
        if obj.get("version") != VERSION:
            raise ValueError(f"{path}: checkpoint version {obj.get('version')} is not supported")
        ck_spec = ModelSpec.from_dict(obj["spec"])
        model = build_model(ck_spec)
        model.load_state_dict(obj["model"])
        return model.eval(), obj
    if spec is None:
        raise ValueError(
            f"{path}: not a splitbits checkpoint; pass the model spec (arch, family, num_classes) "
            "to load an sc2bench/torchdistill checkpoint"
        )
    model = build_model(spec)
    if not isinstance(model, SplitClassifier):
        raise ValueError("sc2bench checkpoints are split students: give spec.family (fp or mshp)")
    ignored = load_sc2bench_checkpoint(model, str(path))
    return model.eval(), {"format": "sc2bench", "kind": "student", "spec": spec.to_dict(),
                          "config": {}, "metrics": {}, "ignored_keys": ignored}
