"""Inference backends by name: ``onnxruntime`` (CPU), ``onnxruntime-cuda``, ``onnxruntime-trt``
(ONNX Runtime's CUDA / TensorRT execution providers), ``tensorrt`` (the bundle's prebuilt engines),
or ``auto``.

``auto`` picks ``tensorrt`` only where TensorRT imports *and* the bundle (pass ``bundle=``) holds
engines for this device and TensorRT version; otherwise ``onnxruntime`` on the CPU.

The torch reference backend lives in ``splitbits.export.torch_backend`` (the runtime never imports
torch); it needs the model object, so it is built directly: ``TorchBackend(model)``.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from splitbits.runtime.backends.base import Backend, Session
from splitbits.runtime.errors import BackendError

if TYPE_CHECKING:
    from splitbits.runtime.bundle import Bundle

log = logging.getLogger(__name__)

BACKENDS: dict[str, str] = {
    "onnxruntime": "splitbits.runtime.backends.onnxruntime:OrtBackend",
    "onnxruntime-cuda": "splitbits.runtime.backends.onnxruntime:OrtCudaBackend",
    "onnxruntime-trt": "splitbits.runtime.backends.onnxruntime:OrtTrtBackend",
    "tensorrt": "splitbits.runtime.backends.tensorrt:TrtBackend",
}


def _auto(bundle: Bundle | None, options: dict[str, Any]) -> Backend:
    trt_opts = {k: v for k, v in options.items() if k in ("precision", "cuda_graph")}
    if bundle is not None:
        try:
            be = get_backend("tensorrt", **trt_opts)
        except BackendError as exc:
            log.debug("auto: not tensorrt (%s)", exc)
        else:
            if be.has_engines(bundle):  # type: ignore[attr-defined]
                return be
            log.info("auto: TensorRT is here but %s has no engines for %s; using onnxruntime",
                     bundle.path, be.device)  # type: ignore[attr-defined]
    ort_opts = {k: v for k, v in options.items() if k == "threads"}
    return get_backend("onnxruntime", **ort_opts)


def get_backend(name: str = "auto", *, bundle: Bundle | None = None, **options: Any) -> Backend:
    """Instantiate a backend by name; ``auto`` needs ``bundle`` to consider TensorRT (see above)."""
    if name == "auto":
        return _auto(bundle, options)
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    modname, clsname = BACKENDS[name].split(":")
    try:
        cls = getattr(importlib.import_module(modname), clsname)
    except ImportError as exc:
        raise BackendError(f"backend {name!r} is unavailable here: {exc}") from exc
    return cls(**options)


__all__ = ["BACKENDS", "Backend", "Session", "get_backend"]
