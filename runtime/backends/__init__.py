"""Inference backends by name: ``onnxruntime``, ``tensorrt``, ``torch`` (reference), or ``auto``.

The torch reference backend lives in ``splitbits.export`` (the runtime never imports torch) and
needs a model object: ``get_backend("torch", model=...)``.
"""

from __future__ import annotations

import importlib
from typing import Any

from splitbits.runtime.backends.base import Backend, Session
from splitbits.runtime.errors import BackendError

BACKENDS: dict[str, str] = {
    "onnxruntime": "splitbits.runtime.backends.onnxruntime:OrtBackend",
    "torch": "splitbits.export.torch_backend:TorchBackend",
}


def get_backend(name: str = "auto", **options: Any) -> Backend:
    """Instantiate a backend; ``auto`` picks the fastest one that works here."""
    if name == "auto":
        for candidate in ("tensorrt", "onnxruntime"):
            if candidate not in BACKENDS:
                continue
            try:
                return get_backend(candidate, **options)
            except BackendError:
                continue
        raise BackendError("no inference backend is available (install onnxruntime)")
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    modname, clsname = BACKENDS[name].split(":")
    try:
        cls = getattr(importlib.import_module(modname), clsname)
    except ImportError as exc:
        raise BackendError(f"backend {name!r} is unavailable here: {exc}") from exc
    return cls(**options)


__all__ = ["BACKENDS", "Backend", "Session", "get_backend"]
