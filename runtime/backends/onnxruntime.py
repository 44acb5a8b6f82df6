"""ONNX Runtime backend (CPU everywhere; CUDA / TensorRT execution providers where present)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from splitbits.runtime.backends.base import Backend, Session
from splitbits.runtime.errors import BackendError

if TYPE_CHECKING:
    from splitbits.runtime.bundle import Bundle

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class OrtSession(Session):
    def __init__(self, sess) -> None:
        self._sess = sess
        self.input_names = [i.name for i in sess.get_inputs()]
        self.output_names = [o.name for o in sess.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._sess.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs))


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, providers: list[str] | None = None, threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError("onnxruntime is not installed: pip install 'splitbits[runtime]'") from exc
        self._ort = ort
        available = ort.get_available_providers()
        wanted = [PROVIDER_ALIASES.get(p, p) for p in (providers or ["cpu"])]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise BackendError(f"ONNX Runtime providers {missing} unavailable here (have {available})")
        self.providers = wanted
        self.threads = threads

    def graph_path(self, bundle: Bundle, graph: str) -> Path:
        """The ONNX file a session of ``graph`` runs: the bundle's."""
        return bundle.graph(graph)

    def load(self, bundle: Bundle, graph: str) -> Session:
        so = self._ort.SessionOptions()
        so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            so.intra_op_num_threads = self.threads
        so.log_severity_level = 3
        path = self.graph_path(bundle, graph)
        try:
            sess = self._ort.InferenceSession(str(path), so, providers=self._providers_for(bundle))
        except Exception as exc:  # ORT raises its own exception types
            raise BackendError(f"ONNX Runtime could not load {graph} ({path}): {exc}") from exc
        return OrtSession(sess)

    def _providers_for(self, bundle: Bundle) -> list:
        """Providers (names or ``(name, options)``) for a session of ``bundle``."""
        return list(self.providers)

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "onnxruntime": self._ort.__version__, "providers": ",".join(self.providers)}


class OrtCudaBackend(OrtBackend):
    """ONNX Runtime on the CUDA execution provider (CPU for what CUDA lacks)."""

    name = "onnxruntime-cuda"

    def __init__(self, threads: int = 0) -> None:
        super().__init__(providers=["cuda", "cpu"], threads=threads)


class OrtTrtBackend(OrtBackend):
    """ONNX Runtime on its TensorRT execution provider (FP32; engines cached in the bundle's
    ``engines/ort-trt-cache``), with CUDA and CPU behind it for unsupported nodes."""

    name = "onnxruntime-trt"

    def __init__(self, threads: int = 0) -> None:
        super().__init__(providers=["tensorrt", "cuda", "cpu"], threads=threads)

    def _providers_for(self, bundle: Bundle) -> list:
        cache = bundle.path / "engines" / "ort-trt-cache"
        cache.mkdir(parents=True, exist_ok=True)
        opts = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache), "trt_fp16_enable": False}
        return [("TensorrtExecutionProvider", opts), "CUDAExecutionProvider", "CPUExecutionProvider"]
