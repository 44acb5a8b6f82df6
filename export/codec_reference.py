"""The torch side of ``splitbits bench codec``: compressai's coders and the ResNet-50 latent sets.

* ``compressai_core``: compressai's C++ rANS (``compressai.ans``) with the table lists built once,
  its bare coder; ``compressai``: compressai as its users call it (``GaussianConditional.compress``
  / ``decompress`` with the exported tables loaded through compressai's own buffer loading), which
  converts the tables to lists on every call — the issue's reference.
* ``resnet50_mshp_224`` / ``resnet50_fp_224``: the Entropic-Student ResNet-50 bottleneck, untrained
  but with compressai ``update()`` tables (seeded), on 224×224 images; for MSHP the integer hyper
  path against the float one on the same latents (bytes, idx, argmax agreement of the tail, time).

The timing, bytes and judging are the runtime's (``splitbits.runtime.codec.bench``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from compressai.ans import RansDecoder, RansEncoder
from compressai.entropy_models import GaussianConditional
from compressai.models.utils import update_registered_buffers

from splitbits.export.bundle import DEFAULT_OPSET, GraphModule, codec_arrays, export_onnx
from splitbits.export.hyper_int import compare_with_float, hyper_int_params, summary
from splitbits.runtime.bundle import CodecParams
from splitbits.runtime.codec import CdfTables, get_coder
from splitbits.runtime.codec.bench import LatentSet, Section, channel_section, flat, hyper_times
from splitbits.runtime.hyper_int import IntHyperSession
from splitbits.runtime.quant import channel_means, dequantize, quantize
from splitbits.trainer.models import ModelSpec, SplitClassifier, build_model


class CompressaiCore:
    """compressai's C++ rANS (``compressai.ans``) with the table lists built once: its bare coder."""

    name = "compressai_core"

    def __init__(self) -> None:
        self._enc, self._dec = RansEncoder(), RansDecoder()
        self._lists: dict[int, tuple[CdfTables, tuple[list, list, list]]] = {}

    def _lists_of(self, t: CdfTables) -> tuple[list, list, list]:
        hit = self._lists.get(id(t))
        if hit is None or hit[0] is not t:
            hit = (t, (t.cdf.tolist(), t.length.tolist(), t.offset.tolist()))
            self._lists[id(t)] = hit
        return hit[1]

    def encode(self, symbols: np.ndarray, index: np.ndarray, tables: CdfTables) -> bytes:
        return self._enc.encode_with_indexes(symbols.tolist(), index.tolist(), *self._lists_of(tables))

    def decode(self, blob: bytes, index: np.ndarray, tables: CdfTables) -> np.ndarray:
        return np.asarray(self._dec.decode_with_indexes(blob, index.tolist(), *self._lists_of(tables)), np.int32)


def gaussian_conditional(t: CdfTables) -> GaussianConditional:
    """A ``GaussianConditional`` holding the tables ``t``, loaded as compressai loads a checkpoint's
    (``update_registered_buffers`` resizes its empty buffers, then ``load_state_dict``)."""
    gc = GaussianConditional(None)
    state = {"_quantized_cdf": torch.from_numpy(t.cdf.copy()), "_offset": torch.from_numpy(t.offset.copy()),
             "_cdf_length": torch.from_numpy(t.length.copy())}
    update_registered_buffers(gc, "gc", list(state), {f"gc.{k}": v for k, v in state.items()})
    gc.load_state_dict(state, strict=False)  # no scale table: the indexes are given
    return gc


class CompressaiModel:
    """compressai as its users call it: ``GaussianConditional.compress`` / ``decompress`` with the
    exported tables loaded (indexes given; the tables are converted to lists on every call)."""

    name = "compressai"

    def __init__(self) -> None:
        self._models: dict[int, tuple[CdfTables, GaussianConditional]] = {}

    def _model(self, t: CdfTables) -> GaussianConditional:
        hit = self._models.get(id(t))
        if hit is None or hit[0] is not t:
            hit = (t, gaussian_conditional(t))
            self._models[id(t)] = hit
        return hit[1]

    def encode(self, symbols: np.ndarray, index: np.ndarray, tables: CdfTables) -> bytes:
        x = torch.from_numpy(symbols.astype(np.float64)).reshape(1, -1)
        return self._model(tables).compress(x, torch.from_numpy(index).reshape(1, -1))[0]

    def decode(self, blob: bytes, index: np.ndarray, tables: CdfTables) -> np.ndarray:
        out = self._model(tables).decompress([blob], torch.from_numpy(index).reshape(1, -1))
        return out.numpy().reshape(-1).astype(np.int32)


def compressai_coders() -> dict[str, Any]:
    """compressai's two coders by their benchmark names."""
    return {"compressai": CompressaiModel(), "compressai_core": CompressaiCore()}


def set_torch_threads(n: int) -> int:
    """Put torch on ``n`` threads (0: leave torch's default); returns the threads torch uses."""
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------
# ResNet-50 latent sets
# ---------------------------------------------------------------------------------------------


def _onnx_hyper(model: SplitClassifier, z_shape: tuple[int, int, int], tmpdir: str) -> Callable[[np.ndarray], Any]:
    """The model's ``h_s`` exported as the bundle's ``hyper.onnx`` is, on ONNX Runtime (one thread):
    the float path as the runtime runs it."""
    import onnxruntime as ort

    path = Path(tmpdir) / "hyper.onnx"
    export_onnx(GraphModule(model, "hyper"), torch.zeros((1, *z_shape)), path, "z_hat", ["scales", "means"],
                DEFAULT_OPSET)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda zh: sess.run(None, {"z_hat": zh})


def _model(family: str) -> tuple[SplitClassifier, dict[str, np.ndarray], CodecParams]:
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="resnet50", family=family, num_classes=1000, input_size=224)).eval()
    model.update_entropy_tables(force=True)
    arrays = codec_arrays(model)
    return model, arrays, CodecParams.from_arrays(arrays, family)


def _fp_set(x: torch.Tensor, source: str) -> LatentSet:
    model, _, codec = _model("fp")
    with torch.no_grad():
        (y,) = (t.numpy() for t in model.run_head(x))
    sy = quantize(y, channel_means(codec.y_medians))
    return LatentSet("resnet50_fp_224", "fp", f"ResNet-50 FP bottleneck (untrained, updated); {source}",
                     [channel_section("y", codec.y_tables, sy)])


def _mshp_set(x: torch.Tensor, source: str, hyper_repeats: int) -> LatentSet:
    model, arrays, codec = _model("mshp")
    with torch.no_grad():
        y, z = (t.numpy() for t in model.run_head(x))
    zmeans = channel_means(codec.z_medians)
    sz = quantize(z, zmeans)
    bl = model.bottleneck_layer
    z_shape = tuple(z.shape[1:])
    # calibrated on the first 4 images, as an export calibrates on its golden ones
    params = hyper_int_params(bl, arrays["z_medians"], arrays["z_offset"], arrays["z_cdf_length"], sz[:4])
    paths = compare_with_float(params, bl, sz, codec.z_medians, codec.scale_table, codec.scale_bound)
    sy_i, sy_f = quantize(y, paths.means_int), quantize(y, paths.means_float)
    secs = [channel_section("z", codec.z_tables, sz),
            Section("y", codec.y_tables, [flat(s) for s in sy_i], [flat(i) for i in paths.idx_int])]
    ls = LatentSet("resnet50_mshp_224", "mshp", "ResNet-50 MSHP bottleneck (untrained, updated), integer hyper "
                   f"path; {source}", secs)
    # the float path on the same latents: bytes, idx, argmax agreement of the tail, time
    with torch.no_grad():
        tail_i = model.run_tail(torch.from_numpy(dequantize(sy_i, paths.means_int))).argmax(1).numpy()
        tail_f = model.run_tail(torch.from_numpy(dequantize(sy_f, paths.means_float))).argmax(1).numpy()
    coder, zsec = get_coder("numba"), secs[0]

    def payload(sy: np.ndarray, idx: np.ndarray) -> float:
        return float(np.mean([len(coder.encode(zsec.symbols[i], zsec.index[i], codec.z_tables))
                              + len(coder.encode(sy[i], idx[i], codec.y_tables)) for i in range(len(sy))]))

    ls.hyper = {
        "bytes_float": payload(sy_f, paths.idx_float),
        "bytes_int": payload(sy_i, paths.idx_int),
        "idx_agreement": paths.idx_agreement,
        "max_abs_mean_difference": paths.max_abs_mean_error,
        "top1_agreement_int_vs_float": float((tail_i == tail_f).mean()),
        "top1_note": "untrained backbone: argmax agreement of the tail between the two paths, not accuracy",
        "int_params": summary(params),
    }
    session = IntHyperSession(params, params.graph(), codec.scale_table, codec.scale_bound, threads=1)
    ls.hyper.update(hyper_times(session, sz[0], lambda d: _onnx_hyper(model, z_shape, d),
                                dequantize(sz[:1], zmeans), hyper_repeats, codec.scale_table, codec.scale_bound))
    return ls


def resnet50_sets(images: np.ndarray, source: str, hyper_repeats: int) -> list[LatentSet]:
    """The untrained-but-updated ResNet-50 MSHP and FP bottlenecks on ``images`` (224×224)."""
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255))
    return [_mshp_set(x, source, hyper_repeats), _fp_set(x, source)]
