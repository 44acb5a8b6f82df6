"""Export of the MSHP hyper-synthesis as a deterministic integer path (``hyper_int.npz``).

The runtime side and the exactness argument are in ``splitbits.runtime.hyper_int``. Here:

* weights: per output channel ``w_q = round(w · 2^Fw_c)`` with the largest ``Fw_c`` that keeps
  ``|w_q| ≤ 2¹⁵−1``;
* activations: one fixed-point exponent ``F_i`` per layer, from a worst-case bound: the largest
  ``|activation|`` any ẑ inside the z tables' support can produce (propagated through ``|w|``),
  kept below ``2²²`` (4× headroom to the ``2²⁴`` saturation). Saturation is thus only reached by
  ẑ outside the support (escaped, i.e. attacked or hostile), where it is still deterministic;
* the z medians become an integer bias map of the first accumulator (computed in float64 here,
  stored as integers, so the runtime never sees a float);
* the scale table becomes integer thresholds at the final accumulator's fixed point.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from splitbits.runtime.hyper_int import (
    A_MAX,
    FORMAT_VERSION,
    SLOPE_BITS,
    W_MAX,
    IntHyperParams,
)
from splitbits.runtime.quant import dequantize, scale_indexes
from splitbits.trainer.models import MSHPBottleneck

HYPER_INT = "hyper_int.npz"
FW_CAP = 30  # weight fraction bits at most
F_CAP = 24  # activation fraction bits at most
HEADROOM_BITS = 2  # worst-case in-support activation ≤ A_MAX / 2**HEADROOM_BITS


def _layers(h_s: nn.Sequential) -> list[tuple[nn.Module, float | None]]:
    """(conv, slope of the activation after it or None) for each convolution of ``h_s``."""
    mods = list(h_s.children())
    out: list[tuple[nn.Module, float | None]] = []
    for i, m in enumerate(mods):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if m.groups != 1 or tuple(m.dilation) != (1, 1) or m.bias is not None:
                raise ValueError("integer hyper path: only groups=1, dilation=1, bias-free convolutions")
            if m.kernel_size[0] != m.kernel_size[1] or m.stride[0] != m.stride[1] or m.padding[0] != m.padding[1]:
                raise ValueError("integer hyper path: only square kernels, strides and paddings")
            if isinstance(m, nn.ConvTranspose2d) and tuple(m.output_padding) != (0, 0):
                raise ValueError("integer hyper path: output_padding is not supported")
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            slope = None
            if isinstance(nxt, nn.LeakyReLU):
                slope = float(nxt.negative_slope)
            elif isinstance(nxt, nn.ReLU):
                slope = 0.0
            out.append((m, slope))
        elif not isinstance(m, (nn.LeakyReLU, nn.ReLU)):
            raise ValueError(f"integer hyper path: unsupported layer {type(m).__name__}")
    if not out or out[-1][1] is not None or any(s is None for _, s in out[:-1]):
        raise ValueError("integer hyper path: expected conv (→ activation → conv)* with no final activation")
    return out


def _conv(m: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, w, stride=m.stride, padding=m.padding)
    return F.conv2d(x, w, stride=m.stride, padding=m.padding)


def _weight_bits(w: np.ndarray, transposed: bool) -> np.ndarray:
    """Fraction bits per output channel: the largest with ``|round(w · 2^F)| ≤ W_MAX``."""
    axis = (0, 2, 3) if transposed else (1, 2, 3)
    peak = np.abs(w).max(axis=axis)
    bits = np.full(peak.shape, FW_CAP, np.int64)
    nz = peak > 0
    bits[nz] = np.minimum(FW_CAP, np.floor(np.log2(W_MAX / peak[nz])).astype(np.int64))
    return bits


@torch.no_grad()
def hyper_int_arrays(bottleneck: MSHPBottleneck, z_shape: tuple[int, int, int], z_medians: np.ndarray,
                     z_offset: np.ndarray, z_length: np.ndarray, scale_table: np.ndarray,
                     scale_bound: float) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The ``hyper_int.npz`` arrays and metadata of ``bottleneck.h_s`` for ẑ of shape ``z_shape``."""
    layers = _layers(bottleneck.h_s)
    med = np.asarray(z_medians, np.float64).reshape(-1)
    lo = np.asarray(z_offset, np.float64).reshape(-1) + med
    hi = lo + np.asarray(z_length, np.float64).reshape(-1) - 3
    bound = torch.from_numpy(np.broadcast_to(np.maximum(np.abs(lo), np.abs(hi))[:, None, None],
                                             z_shape).copy())[None]
    arrays: dict[str, np.ndarray] = {}
    specs = []
    f_prev = 0  # the first input is the integer symbol (ẑ − median)
    act_bits = []
    for i, (m, slope) in enumerate(layers):
        transposed = isinstance(m, nn.ConvTranspose2d)
        w = m.weight.detach().double().cpu().numpy()
        fw = _weight_bits(w, transposed)
        ch = (None, slice(None), None, None) if transposed else (slice(None), None, None, None)
        wq = np.round(w * np.exp2(fw)[ch]).astype(np.int64)
        if np.abs(wq).max() > W_MAX:
            raise AssertionError("weight quantisation overflow")
        arrays[f"w{i}"] = wq.astype(np.int32)
        spec: dict[str, Any] = {"transposed": transposed, "stride": int(m.stride[0]), "padding": int(m.padding[0]),
                                "kind": type(m).__name__}
        if i == 0:
            med_map = torch.from_numpy(np.broadcast_to(med[:, None, None], z_shape).copy())[None]
            arrays["bias0"] = np.round(_conv(m, med_map, torch.from_numpy(wq.astype(np.float64)))[0].numpy()
                                       ).astype(np.int64)
        # worst-case |pre-activation| for in-support ẑ (float weights; the activation never grows it)
        bound = _conv(m, bound, torch.from_numpy(np.abs(w)))
        if slope is None:
            arrays["out_shift"] = (f_prev + fw).astype(np.int64)
            break
        peak = float(bound.max())
        f = F_CAP if peak <= 0 else int(min(F_CAP, math.floor(math.log2(A_MAX / peak)) - HEADROOM_BITS))
        f = max(0, min(f, f_prev + int(fw.min())))  # shifts must be ≥ 0
        arrays[f"shift{i}"] = (f_prev + fw - f).astype(np.int64)
        spec["slope"] = round(slope * (1 << SLOPE_BITS))
        spec["activation_bits"] = f
        act_bits.append(f)
        f_prev = f
        specs.append(spec)
    specs.append(spec)
    c = bottleneck.num_bottleneck_channels
    out_shift = arrays["out_shift"]
    table = np.asarray(scale_table, np.float32).astype(np.float64)[:-1]
    arrays["thresholds"] = np.floor(table[None, :] * np.exp2(out_shift[:c])[:, None]).astype(np.int64)
    min_index = int(np.sum(np.asarray(scale_table, np.float32)[:-1] < np.float32(scale_bound)))
    # output shape of the float graph
    out = bottleneck.h_s(torch.zeros((1, *z_shape)))
    meta = {
        "format_version": FORMAT_VERSION,
        "layers": specs,
        "in_shape": list(z_shape),
        "out_shape": [c, int(out.shape[2]), int(out.shape[3])],
        "min_index": min_index,
        "activation_bits": act_bits,
        "weight_bits": [[int(b) for b in _weight_bits(m.weight.detach().double().cpu().numpy(),
                                                       isinstance(m, nn.ConvTranspose2d))] for m, _ in layers],
        "headroom_bits": HEADROOM_BITS,
    }
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays, meta


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


@torch.no_grad()
def compare_with_float(params: IntHyperParams, bottleneck: MSHPBottleneck, z_symbols: np.ndarray,
                       z_medians: np.ndarray, scale_table: np.ndarray, scale_bound: float) -> HyperComparison:
    """The integer path (``params``) against the float one (``bottleneck.hyper``) on ``z_symbols`` [N, Cz, Hz, Wz]."""
    z_hat = dequantize(z_symbols, np.asarray(z_medians, np.float32).reshape(1, -1, 1, 1))
    scales, means = (t.numpy() for t in bottleneck.hyper(torch.from_numpy(z_hat)))
    int_paths = [params.index_means(z) for z in z_symbols]
    rel_scale = max(float((np.abs(params.scales(z) - s) / np.maximum(np.abs(s), 1e-3)).max())
                    for z, s in zip(z_symbols, scales))
    return HyperComparison(np.stack([i for i, _ in int_paths]), np.stack([m for _, m in int_paths]),
                           scale_indexes(scales, scale_table, scale_bound), means, rel_scale)


def write_hyper_int(model, root: Path, codec: dict[str, np.ndarray], z_shape: tuple[int, int, int]) -> Path:
    """Write ``root/hyper_int.npz`` for an MSHP ``SplitClassifier`` (``codec``: its ``codec.npz`` arrays)."""
    bl = model.bottleneck_layer
    arrays, _ = hyper_int_arrays(bl, tuple(z_shape), codec["z_medians"], codec["z_offset"], codec["z_cdf_length"],
                                 codec["scale_table"], float(codec["scale_bound"]))
    path = Path(root) / HYPER_INT
    np.savez_compressed(path, **arrays)
    IntHyperParams.load(path)  # what the runtime will load must validate
    return path
