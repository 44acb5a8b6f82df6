"""The torch reference backend: runs the checkpoint's own modules behind the runtime's Backend
interface (same graph names and tensor names as the ONNX graphs). Lives in ``export`` because the
runtime never imports torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from splitbits.runtime.backends.base import Backend, Session
from splitbits.trainer.models import SplitClassifier

if TYPE_CHECKING:
    from splitbits.runtime.bundle import Bundle

GRAPH_IO = {
    "head": (["x"], None),
    "hyper": (["z_hat"], ["scales", "means"]),
    "tail": (["y_hat"], ["logits"]),
}


class TorchSession(Session):
    def __init__(self, model: SplitClassifier, graph: str, device: str, dtype: torch.dtype) -> None:
        self.model, self.graph, self.device, self.dtype = model, graph, device, dtype
        self.input_names = GRAPH_IO[graph][0]
        outs = GRAPH_IO[graph][1]
        self.output_names = outs if outs is not None else list(model.bottleneck_layer.latent_names())

    @torch.no_grad()
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (name,) = self.input_names
        x = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device, self.dtype)
        fn = {"head": self.model.run_head, "hyper": self.model.run_hyper, "tail": self.model.run_tail}[self.graph]
        out = fn(x)
        outs = out if isinstance(out, tuple) else (out,)
        return {k: v.float().cpu().numpy() for k, v in zip(self.output_names, outs)}


class TorchBackend(Backend):
    """``TorchBackend(model)``; ``dtype=torch.float16`` simulates an FP16 engine's outputs."""

    name = "torch"

    def __init__(self, model: SplitClassifier | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if model is None:
            raise ValueError("the torch reference backend needs the model (TorchBackend(model=...))")
        self.model = model.eval().to(device=device, dtype=dtype)
        self.device, self.dtype = device, dtype

    def load(self, bundle: Bundle | None, graph: str) -> Session:
        if graph not in GRAPH_IO:
            raise ValueError(f"unknown graph {graph!r}")
        return TorchSession(self.model, graph, self.device, self.dtype)

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "torch": torch.__version__, "device": self.device, "dtype": str(self.dtype)}
