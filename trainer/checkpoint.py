"""Checkpoints: the model's state dict plus the spec, config and metrics that produced it.

Format (a ``torch.save`` dict): ``{"format": "splitbits-ckpt", "version": 2, "kind": "teacher" | "student",
"spec": ModelSpec dict, "model": state_dict, "config": dict, "metrics": dict, "train_state": dict | None,
"digest": sha256 hex}``. ``train_state`` (optimizer, scheduler, epoch, stage, RNG) makes training
resumable. ``digest`` covers every other entry (tensors by dtype, shape and bytes; plain values by
type and value), so a flipped byte anywhere is refused on load. Version 1 (no digest) still loads,
with a warning.

**Loading never runs code.** Every file goes through ``torch.load(weights_only=True)``: tensors,
containers and plain values only, plus an allowlist of the plain types that sc2bench/torchdistill
checkpoints hold (``argparse.Namespace`` args, numpy scalars and numeric arrays). A pickle that
asks for anything else (``os.system``, ``eval``, a class of its own) is refused with a
:class:`CheckpointError` naming the global; there is no fallback to unsafe loading.
sc2bench / torchdistill checkpoints (``{"model": state_dict}`` or a bare state dict) load through
:func:`load_model` when a ``spec`` is given.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from splitbits.runtime.errors import SplitbitsError
from splitbits.trainer.models import ModelSpec, SplitClassifier, build_model, load_sc2bench_state

log = logging.getLogger(__name__)

FORMAT = "splitbits-ckpt"
VERSION = 2
READABLE_VERSIONS = (1, 2)

# Plain types that checkpoints written by other tools hold besides tensors: torchdistill stores its
# argparse ``args``; numpy scalars/arrays appear in metrics and (splitbits v1) in the numpy RNG state.
# Every entry only stores data; object arrays are not allowed (their dtype is not listed).
_NUMPY_DTYPES = [type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGSUV"]
SAFE_GLOBALS: list[Any] = [argparse.Namespace, np.core.multiarray._reconstruct, np.core.multiarray.scalar,
                           np.ndarray, np.dtype, *_NUMPY_DTYPES]


class CheckpointError(SplitbitsError, ValueError):
    """A checkpoint that cannot be loaded safely: unreadable, code in its pickle, wrong content, tampered."""


_GLOBAL_RE = re.compile(r"GLOBAL (\S+)|got <class '([^']+)'>|Unsupported global: GLOBAL (\S+)")


def _blocked_global(message: str) -> str | None:
    m = _GLOBAL_RE.search(message)
    return next((g for g in m.groups() if g), None) if m else None


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` restricted to tensors and plain data (see the module docstring); CPU tensors.

    Raises :class:`CheckpointError` for a missing/unreadable file or a pickle that needs anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found (or not a file): {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds on a corrupt or hostile file
        text = str(exc)
        name = _blocked_global(text)
        if name is not None or "Weights only load failed" in text:
            what = f"'{name}'" if name else "objects other than tensors and plain data"
            raise CheckpointError(
                f"{path}: refused: its pickle asks for {what}, which could run code; splitbits loads "
                "only tensors and plain data. If you trust the file, re-save just its state dict "
                "(torch.save(model.state_dict(), ...)) and load that") from None
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first})") from None


def _digest_update(h: Any, obj: Any) -> None:
    """Feed a canonical encoding of ``obj`` (tensors, containers, plain values) into ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        items = sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        h.update(f"D{len(items)}:".encode())
        for k, v in items:
            _digest_update(h, k)
            _digest_update(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        for v in obj:
            _digest_update(h, v)
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))
    elif obj is None or isinstance(obj, (bool, int, str, bytes)):
        data = repr(obj).encode()
        h.update(f"{type(obj).__name__[0]}{len(data)}:".encode() + data)
    else:
        raise TypeError(f"checkpoints hold tensors and plain values only, not {type(obj).__name__}")


def content_digest(obj: Mapping[str, Any]) -> str:
    """sha256 over every entry of a checkpoint dict except ``digest``."""
    h = hashlib.sha256()
    _digest_update(h, {k: v for k, v in obj.items() if k != "digest"})
    return h.hexdigest()


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
    obj: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "spec": spec.to_dict(),
        "model": module.state_dict(),
        "config": config or {},
        "metrics": metrics or {},
        "train_state": train_state,
    }
    obj["digest"] = content_digest(obj)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _check_splitbits(path: Path, obj: dict[str, Any]) -> None:
    version = obj.get("version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint version {version!r} is not supported "
                              f"(this splitbits reads {', '.join(map(str, READABLE_VERSIONS))})")
    if version >= 2:
        try:
            digest = content_digest(obj)
        except TypeError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        if obj.get("digest") != digest:
            raise CheckpointError(f"{path}: content does not match its digest (corrupted or tampered with)")
    else:
        log.warning("%s: version-1 checkpoint without a digest; its integrity is not checked", path)
    if not isinstance(obj.get("spec"), Mapping) or not isinstance(obj.get("model"), Mapping):
        raise CheckpointError(f"{path}: a splitbits checkpoint needs a 'spec' and a 'model' dict")
    if not isinstance(obj.get("config", {}), Mapping) or not isinstance(obj.get("metrics", {}), Mapping):
        raise CheckpointError(f"{path}: 'config' and 'metrics' must be dicts")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict safely (:func:`safe_torch_load`); a splitbits checkpoint's digest and
    layout are checked. Raises :class:`CheckpointError` on anything unreadable or unexpected."""
    path = Path(path)
    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        _check_splitbits(path, obj)
    return obj


def state_dict_of(path: str | os.PathLike, obj: Any) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: ``{'model'|'state_dict': sd}`` or ``sd`` itself,
    ``module.`` prefixes (DDP) removed; every entry must be a tensor."""
    sd = obj
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                sd = obj[key]
                break
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(f"{path}: not a state dict or a {{'model': state_dict}} checkpoint")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state dict entries must be named tensors; {len(bad)} are not, "
                              f"e.g. {bad[0]!r}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_model(path: str | os.PathLike, spec: ModelSpec | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint (eval mode, CPU). Returns ``(model, checkpoint_dict)``.

    A splitbits checkpoint carries its own spec; an sc2bench checkpoint needs ``spec``.
    """
    path = Path(path)
    return model_from_checkpoint(path, read_checkpoint(path), spec)


def model_from_checkpoint(path: Path, obj: dict[str, Any], spec: ModelSpec | None = None
                          ) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_model` for a checkpoint dict already read by :func:`read_checkpoint` (``path`` names it)."""
    if obj.get("format") == FORMAT:
        try:
            ck_spec = ModelSpec.from_dict(obj["spec"])
            model = build_model(ck_spec)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad model spec ({exc})") from None
        _load_state(path, model, state_dict_of(path, obj["model"]))
        return model.eval(), obj
    if spec is None:
        raise CheckpointError(
            f"{path}: not a splitbits checkpoint, so it carries no model spec; for an sc2bench/torchdistill "
            "checkpoint give --arch and --family (and --num-classes/--input-size if not 1000/224; in a "
            "campaign: arch, family, ... in its models entry), or use the bundle exported from it"
        )
    model = build_model(spec)
    if not isinstance(model, SplitClassifier):
        raise CheckpointError("sc2bench checkpoints are split students: give spec.family (fp or mshp)")
    try:
        ignored = load_sc2bench_state(model, state_dict_of(path, obj))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {_first_line(exc)}") from None
    return model.eval(), {"format": "sc2bench", "kind": "student", "spec": spec.to_dict(),
                          "config": {}, "metrics": {}, "ignored_keys": ignored}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_state(path: Path, model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    try:
        model.load_state_dict(sd)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the weights do not fit the model of its spec ({_first_line(exc)})") from None
