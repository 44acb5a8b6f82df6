"""Deterministic integer hyper-synthesis for MSHP: ẑ symbols → (scale indexes, means), bit-exact
on every platform whatever engine runs the rest of the model.

Why: the decoder recomputes the scale indexes from ẑ. If its hyper-synthesis differs by one ulp
from the encoder's (TensorRT FP16 on a Jetson, ONNX Runtime on an x86 server), an index flips and
everything after it decodes to garbage. Here the path that produces ``idx`` and the means uses
integers only, so both sides agree bit for bit:

* weights are integers ``|w| < 2¹⁵`` (per output channel, quantised at export), activations are
  integers saturated to ``|a| < 2²⁴`` and the reduction depth ``K = C_in·k²`` is below ``2¹⁴``, so
  every product and every partial sum is an integer below ``2⁵³``: a float64 GEMM (im2col + BLAS)
  is *exact* whatever the summation order, FMA or vector width;
* re-quantisation between layers (rounding shift per channel), saturation and LeakyReLU (an
  integer slope and a shift) are int64 numpy operations: deterministic;
* the median of ẑ enters as an integer bias map fixed at export (ẑ = symbol + median), so the
  input is the integer symbol itself (clamped, which only a hostile packet can reach);
* ``idx`` compares the integer scale accumulator with the scale table converted at export to the
  same fixed point (``thresholds``), and the means are ``float32(acc · 2^−S)``, an exact scaling
  followed by one IEEE rounding: identical everywhere, so ŷ is identical on both sides.

The parameters live in the bundle's ``hyper_int.npz`` (written by ``splitbits.export.hyper_int``),
covered by the bundle fingerprint; ``load`` validates every bound above before anything runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from splitbits.runtime.errors import BundleError

FORMAT_VERSION = 1
W_MAX = (1 << 15) - 1  # |integer weight| bound
A_MAX = (1 << 24) - 1  # |integer activation| bound (saturation)
EXACT = 1 << 53  # float64 integers are exact below this
SLOPE_BITS = 22  # LeakyReLU slope as an integer over 2**SLOPE_BITS


@dataclass(frozen=True)
class IntLayer:
    """One convolution of the integer path (weights as exact float64 integers)."""

    transposed: bool
    weight: np.ndarray  # conv: [Cout, Cin, k, k]; transposed conv: [Cin, Cout, k, k]
    stride: int
    padding: int
    shift: np.ndarray | None  # int64 [Cout]: right shift to the next activation (None: last layer)
    slope: int  # LeakyReLU slope · 2**SLOPE_BITS after this layer (ignored for the last layer)

    @property
    def cin(self) -> int:
        return self.weight.shape[0 if self.transposed else 1]

    @property
    def cout(self) -> int:
        return self.weight.shape[1 if self.transposed else 0]

    @property
    def k(self) -> int:
        return self.weight.shape[2]

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        k, s, p = self.k, self.stride, self.padding
        if self.transposed:
            return (h - 1) * s - 2 * p + k, (w - 1) * s - 2 * p + k
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    def apply(self, a: np.ndarray) -> np.ndarray:
        """Integer convolution of ``a`` (int64 [Cin, H, W], ``|a| ≤ A_MAX``) → int64 accumulator."""
        cin, h, w = a.shape
        k, s, p = self.k, self.stride, self.padding
        x = a.astype(np.float64)
        if self.transposed:
            # cols[co, ky, kx, i] = Σ_ci w[ci, co, ky, kx] · x[ci, i]; then scatter-add (col2im). An output
            # sums at most cin·k² products, so these float64 sums are exact too (the bound in load()).
            cols = (self.weight.reshape(cin, -1).T @ x.reshape(cin, -1)).reshape(self.cout, k, k, h, w)
            full = np.zeros((self.cout, (h - 1) * s + k, (w - 1) * s + k))
            for ky in range(k):
                for kx in range(k):
                    full[:, ky:ky + (h - 1) * s + 1:s, kx:kx + (w - 1) * s + 1:s] += cols[:, ky, kx]
            ho, wo = self.out_hw(h, w)
            return full[:, p:p + ho, p:p + wo].astype(np.int64)
        if p:
            x = np.pad(x, ((0, 0), (p, p), (p, p)))
        win = sliding_window_view(x, (k, k), axis=(1, 2))[:, ::s, ::s]  # [Cin, Ho, Wo, k, k]
        ho, wo = win.shape[1:3]
        patches = np.ascontiguousarray(win.transpose(0, 3, 4, 1, 2)).reshape(cin * k * k, ho * wo)
        return (self.weight.reshape(self.cout, -1) @ patches).astype(np.int64).reshape(self.cout, ho, wo)


def requantize(acc: np.ndarray, shift: np.ndarray, slope: int) -> np.ndarray:
    """Rounding right shift per channel, saturation to ±A_MAX, then integer LeakyReLU."""
    sh = shift.reshape(-1, 1, 1)
    a = np.clip((acc + ((np.int64(1) << sh) >> 1)) >> sh, -A_MAX, A_MAX)
    neg = (a * np.int64(slope) + (np.int64(1) << (SLOPE_BITS - 1))) >> SLOPE_BITS
    return np.where(a < 0, neg, a)


@dataclass(frozen=True)
class IntHyperParams:
    """Everything the integer path needs (``hyper_int.npz``)."""

    layers: tuple[IntLayer, ...]
    bias0: np.ndarray  # int64 [C1, H1, W1]: the z medians' contribution to the first accumulator
    in_shape: tuple[int, int, int]  # ẑ symbols [Cz, Hz, Wz]
    out_shape: tuple[int, int, int]  # y [C, H, W]
    out_shift: np.ndarray  # int64 [2C]: final accumulator = value · 2**out_shift
    thresholds: np.ndarray  # int64 [C, T-1]: floor(scale_table[t] · 2**out_shift[c])
    min_index: int  # #{t : scale_table[t] < scale_bound}
    meta: dict

    @classmethod
    def load(cls, path: str | Path) -> IntHyperParams:
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            meta = json.loads(str(arrays["meta"]))
        except Exception as exc:  # zip/JSON/key errors of a damaged file
            raise BundleError(f"{path}: unreadable integer hyper parameters ({exc})") from exc
        try:
            return cls.from_arrays(arrays, meta)
        except (KeyError, ValueError, TypeError) as exc:
            raise BundleError(f"{path}: invalid integer hyper parameters ({exc})") from exc

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict) -> IntHyperParams:
        """Build and validate (every bound the exactness argument relies on)."""
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        specs = meta["layers"]
        if not 1 <= len(specs) <= 8:
            raise ValueError("1..8 layers expected")
        layers = []
        shape = tuple(int(d) for d in meta["in_shape"])
        for i, spec in enumerate(specs):
            w = np.asarray(arrays[f"w{i}"])
            if w.dtype.kind != "i" or w.ndim != 4 or w.shape[2] != w.shape[3] or np.abs(w).max(initial=0) > W_MAX:
                raise ValueError(f"layer {i}: weights must be int [.., .., k, k] with |w| ≤ {W_MAX}")
            last = i == len(specs) - 1
            shift = None if last else np.asarray(arrays[f"shift{i}"]).astype(np.int64).reshape(-1)
            layer = IntLayer(bool(spec["transposed"]), np.ascontiguousarray(w, dtype=np.float64),
                             int(spec["stride"]), int(spec["padding"]), shift, int(spec.get("slope", 0)))
            if layer.cin != shape[0] or layer.stride < 1 or not 0 <= layer.padding < layer.k:
                raise ValueError(f"layer {i}: input channels/stride/padding do not fit")
            if layer.cin * layer.k * layer.k * W_MAX * A_MAX >= EXACT:
                raise ValueError(f"layer {i}: reduction too deep for exact float64 sums")
            if shift is not None and (shift.shape != (layer.cout,) or shift.min() < 0 or shift.max() > 60):
                raise ValueError(f"layer {i}: shifts must be one per output channel in 0..60")
            if not 0 <= layer.slope < (1 << SLOPE_BITS):
                raise ValueError(f"layer {i}: slope outside [0, 1)")
            ho, wo = layer.out_hw(*shape[1:])
            if ho < 1 or wo < 1:
                raise ValueError(f"layer {i}: empty output")
            if i == 0:
                first_out = (layer.cout, ho, wo)
            shape = (layer.cout, ho, wo)
            layers.append(layer)
        c = shape[0] // 2
        out_shape = (c, shape[1], shape[2])
        if tuple(meta["out_shape"]) != out_shape or shape[0] != 2 * c:
            raise ValueError(f"output shape {shape} does not give scales and means of {meta['out_shape']}")
        bias0 = np.asarray(arrays["bias0"]).astype(np.int64)
        if bias0.shape != first_out or np.abs(bias0).max(initial=0) >= EXACT // 4:
            raise ValueError("bias0 must match the first layer's output and be bounded")
        out_shift = np.asarray(arrays["out_shift"]).astype(np.int64).reshape(-1)
        thr = np.asarray(arrays["thresholds"]).astype(np.int64)
        if out_shift.shape != (2 * c,) or out_shift.min() < 0 or out_shift.max() > 60:
            raise ValueError("out_shift must hold one shift in 0..60 per output channel")
        if thr.ndim != 2 or thr.shape[0] != c or thr.shape[1] < 1 or (np.diff(thr, axis=1) < 0).any():
            raise ValueError("thresholds must be [C, T-1] and non-decreasing")
        min_index = int(meta["min_index"])
        if not 0 <= min_index <= thr.shape[1]:
            raise ValueError("min_index outside the scale table")
        return cls(tuple(layers), bias0, tuple(int(d) for d in meta["in_shape"]), out_shape, out_shift, thr,
                   min_index, meta)

    @property
    def num_tables(self) -> int:
        return self.thresholds.shape[1] + 1

    def accumulate(self, z_symbols: np.ndarray) -> np.ndarray:
        """The final integer accumulator [2C, H, W] for one ẑ symbol map [Cz, Hz, Wz]."""
        z = np.asarray(z_symbols)
        if z.shape != self.in_shape or z.dtype.kind not in "iu":
            raise ValueError(f"z symbols must be integers of shape {self.in_shape}, got {z.dtype} {z.shape}")
        a = np.clip(z.astype(np.int64), -A_MAX, A_MAX)
        for i, layer in enumerate(self.layers):
            acc = layer.apply(a)
            if i == 0:
                acc = acc + self.bias0
            if layer.shift is None:
                return acc
            a = requantize(acc, layer.shift, layer.slope)
        raise AssertionError("unreachable: the last layer has no shift")

    def index_means(self, z_symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(idx int32 [C, H, W], means float32 [C, H, W]) for one image's ẑ symbols."""
        acc = self.accumulate(z_symbols)
        c = self.out_shape[0]
        scales, means_acc = acc[:c], acc[c:]
        idx = np.empty(self.out_shape, np.int32)
        for ch in range(c):
            idx[ch] = np.searchsorted(self.thresholds[ch], scales[ch], side="left")
        np.maximum(idx, self.min_index, out=idx)
        means = np.ldexp(means_acc.astype(np.float64), -self.out_shift[c:].reshape(-1, 1, 1)).astype(np.float32)
        return idx, means

    def scales(self, z_symbols: np.ndarray) -> np.ndarray:
        """The integer path's scales as float32 (for analysis only; ``idx`` never goes through this)."""
        acc = self.accumulate(z_symbols)[: self.out_shape[0]]
        return np.ldexp(acc.astype(np.float64), -self.out_shift[: self.out_shape[0]].reshape(-1, 1, 1)).astype(
            np.float32)
