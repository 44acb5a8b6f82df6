"""Export of the MSHP hyper-synthesis as the deterministic integer path (``hyper_int.npz`` and its
graph ``hyper_int.onnx``; the runtime side and the exactness argument are in
``splitbits.runtime.hyper_int``).

With 24 bits per partial sum, precision is a budget: for an output channel, ``Σ|w_q|·A ≤ 2²⁴`` ties
the integer weights ``w_q`` to the activation range ``A``. Here:

* activation ranges are calibrated: per channel, ``R = 1.5 × max|x|`` over the calibration ẑ (the
  export's golden images); beyond ``R`` the path saturates, deterministically;
* each hidden channel's fixed point ``F`` (activation = ``round(x·2^F)``, ``A = ⌈R·2^F⌉``) balances its
  rounding error against that of the next layer's weights on it: ``2^2F ≈ 2^G·rms(w)/rms(x)``, with
  ``G`` the next accumulator's exponent, fixed by the real-valued bound ``Σ|w|·R`` alone;
* per output channel, ``G`` is the largest exponent whose integer weights keep the bound (checked on
  the rounded integers, bias and rounding offset included);
* the mean rounding error of each layer's weights on the calibration inputs is cancelled by an
  integer bias (bias correction);
* the ẑ symbols are clipped to the z tables' support; the medians become the first layer's integer
  bias map.

The graph is then checked against the numpy reference of the same integer function, bit for bit, at
ONNX Runtime's full and disabled graph optimisation, on the calibration ẑ and on random in- and
out-of-support ẑ; a mismatch fails the export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from splitbits.runtime.errors import VerificationError
from splitbits.runtime.hyper_int import (
    EXACT,
    FORMAT_VERSION,
    MAX_CLIP,
    SLOPE_BITS,
    IntHyperParams,
    IntLayer,
    check_layer,
)
from splitbits.runtime.quant import channel_means, dequantize, quantize, scale_indexes
from splitbits.trainer.models import MSHPBottleneck

HYPER_INT = "hyper_int.npz"
HYPER_INT_GRAPH = "hyper_int.onnx"
CALIBRATION_MARGIN = 1.5  # activation range = margin × the largest |value| seen in calibration


@dataclass(frozen=True)
class FloatLayer:
    """One convolution of ``h_s`` in float64, and the slope of the LeakyReLU after it (None: the last)."""

    transposed: bool
    weight: np.ndarray
    stride: int
    padding: int
    slope: float | None

    def conv(self, x: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
        """``x`` [N, Cin, H, W] through this convolution (float64, or ``weight`` instead of its own)."""
        f = F.conv_transpose2d if self.transposed else F.conv2d
        w = self.weight if weight is None else weight
        return f(torch.from_numpy(np.asarray(x, np.float64)), torch.from_numpy(np.asarray(w, np.float64)),
                 stride=self.stride, padding=self.padding).numpy()

    def probe(self, weight: np.ndarray) -> IntLayer:
        """An :class:`IntLayer` of this geometry around ``weight`` (for its bound and shapes)."""
        z = np.zeros(0, np.int64)
        return IntLayer(self.transposed, weight, self.stride, self.padding, z, z, None, 0)

    def per_out(self, v: np.ndarray) -> np.ndarray:
        """``v`` [Cout] shaped to broadcast over the weight's output-channel axis."""
        return v.reshape((1, -1, 1, 1) if self.transposed else (-1, 1, 1, 1))

    def per_in(self, v: np.ndarray) -> np.ndarray:
        return v.reshape((-1, 1, 1, 1) if self.transposed else (1, -1, 1, 1))


def float_layers(h_s: nn.Sequential) -> list[FloatLayer]:
    """``h_s`` as (conv, LeakyReLU slope) pairs: conv (→ LeakyReLU/ReLU → conv)*, no final activation."""
    mods = list(h_s.children())
    out: list[FloatLayer] = []
    for i, m in enumerate(mods):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if m.groups != 1 or tuple(m.dilation) != (1, 1) or m.bias is not None:
                raise ValueError("integer hyper path: only groups=1, dilation=1, bias-free convolutions")
            if m.kernel_size[0] != m.kernel_size[1] or m.stride[0] != m.stride[1] or m.padding[0] != m.padding[1]:
                raise ValueError("integer hyper path: only square kernels, strides and paddings")
            if isinstance(m, nn.ConvTranspose2d) and tuple(m.output_padding) != (0, 0):
                raise ValueError("integer hyper path: output_padding is not supported")
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            slope = float(nxt.negative_slope) if isinstance(nxt, nn.LeakyReLU) else (
                0.0 if isinstance(nxt, nn.ReLU) else None)
            out.append(FloatLayer(isinstance(m, nn.ConvTranspose2d), m.weight.detach().double().cpu().numpy(),
                                  int(m.stride[0]), int(m.padding[0]), slope))
        elif not isinstance(m, (nn.LeakyReLU, nn.ReLU)):
            raise ValueError(f"integer hyper path: unsupported layer {type(m).__name__}")
    if not out or out[-1].slope is not None or any(f.slope is None for f in out[:-1]):
        raise ValueError("integer hyper path: expected conv (→ activation → conv)* with no final activation")
    return out


def _calibrate(layers: list[FloatLayer], z_hat: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per hidden layer and channel: the range ``R`` (margin × max |pre-activation|) and the rms of
    the activation, over the calibration ẑ (float64, exact medians)."""
    ranges, rms = [], []
    x = z_hat
    for f in layers[:-1]:
        x = f.conv(x)
        peak = np.abs(x).max(axis=(0, 2, 3)) * CALIBRATION_MARGIN
        ranges.append(np.maximum(peak, max(float(peak.max()), 1.0) * 2.0**-12))  # a dead channel keeps a range
        x = np.where(x < 0, x * f.slope, x)
        rms.append(np.sqrt((x**2).mean(axis=(0, 2, 3))))
    return ranges, rms


def _fixed_points(layers: list[FloatLayer], ranges: list[np.ndarray], rms: list[np.ndarray]) -> list[np.ndarray]:
    """Each hidden channel's activation exponent ``F`` (module docstring's balance rule), capped so
    that ``A = ⌈R·2^F⌉ ≤ 2²³ − 1``."""
    fps = []
    for i, f in enumerate(layers[:-1]):
        nxt = layers[i + 1]
        hi = ranges[i]
        g = np.median(np.floor(np.log2(EXACT / nxt.probe(nxt.weight).bound(-hi * f.slope, hi))))
        axes = (1, 2, 3) if nxt.transposed else (0, 2, 3)
        w_rms = np.sqrt((nxt.weight**2).mean(axis=axes))
        ok = (w_rms > 0) & (rms[i] > 0)
        ratio = np.where(ok, w_rms / np.where(ok, rms[i], 1.0), 1.0)
        fp = np.round((g + np.log2(ratio)) / 2).astype(np.int64)
        fp[~ok] = int(np.median(fp[ok])) if ok.any() else 0
        fps.append(np.minimum(fp, np.floor(np.log2(MAX_CLIP / hi)).astype(np.int64)))
    return fps


def _slope_q(slope: float | None) -> int:
    return round((slope or 0.0) * (1 << SLOPE_BITS))


def _quantise_layer(f: FloatLayer, f_in: np.ndarray, lo: np.ndarray, hi: np.ndarray, a_cal: np.ndarray,
                    fixed: np.ndarray | None, bias_map: np.ndarray | None) -> tuple[IntLayer, np.ndarray | None]:
    """Integer weights, bias and shift of one layer whose integer inputs (exponents ``f_in``, range
    ``[lo, hi]``) are ``a_cal`` on the calibration set; ``fixed``: the wanted output exponent F (hidden
    layers); ``bias_map``: the first layer's medians (a real-valued ẑ offset map). Returns the layer
    (its clip still zero) and the output exponent it got (≤ ``fixed``; None for the last layer)."""
    w_eff = f.weight * np.exp2(-f.per_in(f_in.astype(np.float64)))  # real weight per input unit
    g = np.floor(np.log2(EXACT / np.maximum(f.probe(w_eff).bound(lo, hi), 1e-300))).astype(np.int64)
    while True:
        target = w_eff * np.exp2(f.per_out(g.astype(np.float64)))
        wq = np.round(target).astype(np.int64)
        err = f.conv(a_cal, wq - target).mean(axis=(0, 2, 3))  # mean rounding error per output channel
        bias = -np.round(err).astype(np.int64)
        if bias_map is not None:
            bias = np.round(f.conv(bias_map, wq)[0]).astype(np.int64) + bias.reshape(-1, 1, 1)
        # shift s = G − F ≥ 1, and ≥ bits(slope) so that the LeakyReLU's r·slope stays below 2**24
        fp = None if fixed is None else np.minimum(fixed, g - max(1, _slope_q(f.slope).bit_length()))
        shift = g if fp is None else g - fp
        layer = IntLayer(f.transposed, wq, f.stride, f.padding, bias, shift,
                         None if fp is None else np.zeros_like(g), _slope_q(f.slope))
        extra = 0 if fp is None else np.int64(1) << (shift - 1)
        worst = layer.bound(lo, hi) + np.abs(bias).reshape(len(g), -1).max(axis=1) + extra
        if (worst <= EXACT).all():
            return layer, fp
        g = g - (worst > EXACT)


def hyper_int_params(bottleneck: MSHPBottleneck, z_medians: np.ndarray, z_offset: np.ndarray,
                     z_length: np.ndarray, calibration: np.ndarray) -> IntHyperParams:
    """The integer path of ``bottleneck.h_s`` for ẑ symbols like ``calibration`` [N, Cz, Hz, Wz]
    (validated by :meth:`IntHyperParams.from_arrays`)."""
    layers = float_layers(bottleneck.h_s)
    offset, length = np.asarray(z_offset, np.int64).reshape(-1), np.asarray(z_length, np.int64).reshape(-1)
    z_clip = (int(offset.min()), int((offset + length - 3).max()))  # the z tables' support
    med = channel_means(np.asarray(z_medians, np.float64))
    cal = np.asarray(calibration, np.int64)
    ranges, rms = _calibrate(layers, cal + med[None])
    fps = _fixed_points(layers, ranges, rms)
    a = np.clip(cal, *z_clip)
    f_in = np.zeros(cal.shape[1], np.int64)
    lo, hi = np.full(cal.shape[1], z_clip[0], np.int64), np.full(cal.shape[1], z_clip[1], np.int64)
    params = IntHyperParams((), tuple(cal.shape[1:]), (0, 0, 0), z_clip, {})
    specs: list[dict[str, Any]] = []
    for i, f in enumerate(layers):
        bias_map = np.broadcast_to(med, cal.shape[1:])[None] if i == 0 else None
        layer, fp = _quantise_layer(f, f_in, lo, hi, a, fps[i] if f.slope is not None else None, bias_map)
        specs.append({"transposed": f.transposed, "stride": f.stride, "padding": f.padding})
        if fp is not None:
            clip = np.clip(np.ceil(ranges[i] * np.exp2(fp)), 1, MAX_CLIP).astype(np.int64)
            layer = replace(layer, clip=clip)
            specs[-1]["slope"] = layer.slope
            a = np.stack([layer.activate(layer.accumulate(x)) for x in a])
            f_in = fp
            lo, hi = check_layer(layer, i, lo, hi)
        params = replace(params, layers=(*params.layers, layer))
    c = bottleneck.num_bottleneck_channels
    out_hw = layers[-1].conv(np.zeros((1, *a.shape[1:])))[0].shape[1:]
    meta = {"format_version": FORMAT_VERSION, "layers": specs, "in_shape": list(cal.shape[1:]),
            "out_shape": [c, *out_hw], "z_clip": list(z_clip),
            "calibration": {"images": int(cal.shape[0]), "margin": CALIBRATION_MARGIN}}
    return IntHyperParams.from_arrays(replace(params, meta=meta).to_arrays(), meta)


@dataclass
class HyperComparison:
    """The integer and the float hyper paths on the same ẑ symbols: per image ``idx`` and means of
    each, and the largest relative error of the integer path's scales."""

    idx_int: np.ndarray
    means_int: np.ndarray
    idx_float: np.ndarray
    means_float: np.ndarray
    max_rel_scale_error: float

    @property
    def idx_agreement(self) -> float:
        """Fraction of scale indexes the two paths agree on."""
        return float((self.idx_int == self.idx_float).mean())

    @property
    def max_abs_mean_error(self) -> float:
        return float(np.abs(self.means_int - self.means_float).max())

    @property
    def mean_abs_mean_error(self) -> float:
        return float(np.abs(self.means_int - self.means_float).mean())


@torch.no_grad()
def compare_with_float(params: IntHyperParams, bottleneck: MSHPBottleneck, z_symbols: np.ndarray,
                       z_medians: np.ndarray, scale_table: np.ndarray, scale_bound: float) -> HyperComparison:
    """The integer path (``params``) against the float one (``bottleneck.hyper``) on ``z_symbols`` [N, Cz, Hz, Wz]."""
    z_hat = dequantize(z_symbols, np.asarray(z_medians, np.float32).reshape(1, -1, 1, 1))
    scales, means = (t.numpy() for t in bottleneck.hyper(torch.from_numpy(z_hat)))
    paths = [params.reference(z) for z in z_symbols]
    s_int = np.stack([s for s, _ in paths])
    rel = float((np.abs(s_int - scales) / np.maximum(np.abs(scales), 1e-3)).max())
    return HyperComparison(scale_indexes(s_int, scale_table, scale_bound), np.stack([m for _, m in paths]),
                           scale_indexes(scales, scale_table, scale_bound), means, rel)


def check_graph(params: IntHyperParams, graph: bytes, z_symbols: np.ndarray, seed: int = 0) -> int:
    """``graph`` on ONNX Runtime (CPU; full and disabled graph optimisation) against the numpy reference,
    bit for bit, on ``z_symbols`` and on random in-support, out-of-support and extreme ẑ; returns the
    number of maps checked, raises :class:`VerificationError` on any difference."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load_from_string(graph), full_check=True)
    rng = np.random.default_rng(seed)
    lo, hi = params.z_clip
    shape = params.in_shape
    cases = [*np.asarray(z_symbols), *(rng.integers(lo, hi + 1, shape) for _ in range(4)),
             *(rng.integers(4 * lo - 10, 4 * hi + 11, shape) for _ in range(2)),
             rng.choice([lo, hi], shape), rng.choice([np.iinfo(np.int32).min, np.iinfo(np.int32).max], shape)]
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    for name, level in levels.items():
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.log_severity_level = 3
        sess = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
        for z in cases:
            z = np.asarray(z, np.int32)
            got = sess.run(None, {"z_symbols": z[None]})[0][0]
            want = np.concatenate(params.reference(z))
            if got.shape != want.shape or not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
                raise VerificationError(f"hyper_int.onnx differs from the integer reference (optimisation {name})")
    return len(cases)


@torch.no_grad()
def write_hyper_int(model, root: Path, codec: dict[str, np.ndarray], x: np.ndarray) -> IntHyperParams:
    """Write ``root/hyper_int.npz`` and ``root/hyper_int.onnx`` for an MSHP ``SplitClassifier``
    (``codec``: its ``codec.npz`` arrays), calibrated and checked on the images ``x`` [N, 3, H, W]."""
    z = model.run_head(torch.from_numpy(np.asarray(x, np.float32)))[1].numpy()
    zsym = quantize(z, channel_means(codec["z_medians"]))
    params = hyper_int_params(model.bottleneck_layer, codec["z_medians"], codec["z_offset"], codec["z_cdf_length"],
                              zsym)
    graph = params.graph()
    check_graph(params, graph, zsym)
    np.savez_compressed(Path(root) / HYPER_INT, **params.to_arrays())
    (Path(root) / HYPER_INT_GRAPH).write_bytes(graph)
    if IntHyperParams.load(Path(root) / HYPER_INT).graph() != graph:  # what the runtime will load
        raise VerificationError("hyper_int.npz does not reload to the same graph")
    return params


def summary(params: IntHyperParams) -> dict[str, Any]:
    """Bits in use per layer (for reports): the largest |weight| and activation range, as log2."""
    return {"weight_bits": [math.log2(max(1, int(np.abs(la.weight).max()))) for la in params.layers],
            "activation_bits": [math.log2(int(la.clip.max())) for la in params.layers if la.clip is not None]}
