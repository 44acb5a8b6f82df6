"""Deterministic hyper-synthesis for MSHP: ẑ symbols → (scale indexes, means), bit-identical on every
device whatever engine runs the rest of the model, at the speed of the float graph.

Why: the decoder recomputes the scale indexes from ẑ. If its hyper-synthesis differs by one ulp from
the encoder's (TensorRT FP16 on a Jetson, ONNX Runtime on an x86 server), an index flips and the rest
of the latent decodes to garbage. So the indexes and means come from one integer function, computed
by an ONNX graph (``hyper_int.onnx``) on ONNX Runtime's CPU provider on every device — never a GPU
provider — whose values are integers (times powers of two) that float32 holds exactly:

* layer ``l``: ``acc = Σ w·a (+ b)`` with integer weights ``w``, integer inputs ``a`` clipped to
  ``[lo, hi]`` per channel and an integer bias ``b`` (the first layer's: the z medians' map). For each
  output channel, ``M = max(Σ max(w·hi, w·lo, 0), −Σ min(w·hi, w·lo, 0))`` over the taps one output
  sees (a transposed convolution: the taps of one stride phase) bounds ``|Σ_S w·a|`` for every subset
  ``S`` of the products, so **every partial sum, in any order, with or without the bias** is an
  integer of magnitude ≤ ``M + |b|``. ``load`` requires ``M + |b| + 2^(s−1) ≤ 2²⁴`` (hidden layers, shift
  ``s``) or ``M + |b| ≤ 2²⁴`` (the last): float32 holds every such integer (scaled by a power of two)
  exactly, so the GEMM/direct/col2im convolution's sums, FMA or not, blocked or vectorised however the
  CPU likes, are exact — the order cannot matter.
* the graph folds ``2^−s`` into the weights and ``b·2^−s + ½`` into the bias (exact: the same integers
  times a power of two), so a hidden convolution yields ``acc·2^−s + ½`` exactly; then ``Floor`` (the
  rounding shift ``r = ⌊(acc + 2^(s−1))/2^s⌋``), ``Min`` with ``A`` per channel (saturation; below,
  the bound itself keeps ``r ≥ r_min = ⌊(2^(s−1) − M − |b|)/2^s⌋``), ``LeakyRelu`` with ``α = q·2^−12``
  (``|r_min|·q + 2¹¹ ≤ 2²⁴``: exact), ``+½`` and ``Floor``: integers again, in
  ``[⌊(r_min·q + 2¹¹)/2¹²⌋, A]``, the next layer's ``[lo, hi]``.
* the first input is the integer symbol ``ẑ − median`` (``Cast``, exact below 2²⁴, then clipped to the
  z tables' support: only escaped, i.e. hostile or attacked, values reach the clip), the medians
  enter as the first layer's integer bias map; the last layer folds ``2^−G`` per channel into its
  weights, so its outputs are the scales and means as exact float32 dyadic numbers.
* ``idx`` = #{t : table[t] < max(scale, bound)}, compared on these exact float32 values
  (:mod:`splitbits.runtime.scale_index`, a lookup equal to ``searchsorted``), as CompressAI does.

ONNX Runtime's CPU graph optimisations keep this exact: measured, it lays the last convolution out as
an NCHWc direct convolution with the bias in the accumulator (a different summation order: exact under
the bound) and fuses no elementwise node; any fusion of ``Clip``/``Relu``-like activations, constant
folding or a power-of-two ``Mul`` into the weights preserves the values above. The integer function
is also computed here in numpy (:meth:`IntHyperParams.accumulate`), and the export checks the graph
against it bit for bit, at every optimisation level, on golden, random and out-of-support ẑ.

The parameters live in ``hyper_int.npz``; the runtime builds the graph from them
(:meth:`IntHyperParams.graph`, no ``onnx`` package needed) and runs the bundle's ``hyper_int.onnx``
only if it is byte for byte that graph, so what runs is what :meth:`IntHyperParams.from_arrays`
validated. Both files are covered by the bundle fingerprint.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from splitbits.runtime.errors import BundleError

FORMAT_VERSION = 2
EXACT = 1 << 24  # float32 holds every integer of magnitude ≤ 2**24
SLOPE_BITS = 12  # LeakyReLU slope as an integer over 2**SLOPE_BITS
MAX_LAYERS = 8
MAX_KERNEL = 15
MAX_REDUCTION = 1 << 15  # Cin·k²: keeps every bound below 2**63 in int64
MAX_SHIFT = 60
MAX_CLIP = (1 << 23) - 1  # |activation| (r + ½ is exact below 2**23)
OPSET = 17


@dataclass(frozen=True)
class IntLayer:
    """One convolution of the integer path (every array int64)."""

    transposed: bool
    weight: np.ndarray  # conv: [Cout, Cin, k, k]; transposed conv: [Cin, Cout, k, k] (torch/ONNX layout)
    stride: int
    padding: int
    bias: np.ndarray  # first layer: [Cout, Ho, Wo] (the medians' map); others: [Cout]
    shift: np.ndarray  # [Cout]: hidden: the rounding shift s ≥ 1; last: G, outputs = acc·2**−G
    clip: np.ndarray | None  # [Cout]: A, the activation's saturation (hidden layers); None for the last
    slope: int  # LeakyReLU slope · 2**SLOPE_BITS (hidden layers)

    @property
    def cin(self) -> int:
        return self.weight.shape[0 if self.transposed else 1]

    @property
    def cout(self) -> int:
        return self.weight.shape[1 if self.transposed else 0]

    @property
    def k(self) -> int:
        return self.weight.shape[2]

    @property
    def last(self) -> bool:
        return self.clip is None

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        k, s, p = self.k, self.stride, self.padding
        if self.transposed:
            return (h - 1) * s - 2 * p + k, (w - 1) * s - 2 * p + k
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    def bound(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """int64 [Cout]: the largest |partial sum| of one output for inputs in ``[lo, hi]`` (per input
        channel, ``lo ≤ 0 ≤ hi``): max over the taps one output sees of ``max(P, −N)``."""
        w = self.weight.transpose(1, 0, 2, 3) if self.transposed else self.weight  # [Cout, Cin, k, k]
        a, b = w * hi.reshape(1, -1, 1, 1), w * lo.reshape(1, -1, 1, 1)
        pos, neg = np.maximum(np.maximum(a, b), 0), np.minimum(np.minimum(a, b), 0)
        s = self.stride if self.transposed else 1  # a transposed conv's output sees one stride phase
        best = np.zeros(self.cout, np.int64)
        for py in range(s):
            for px in range(s):
                p = pos[:, :, py::s, px::s].sum(axis=(1, 2, 3))
                n = neg[:, :, py::s, px::s].sum(axis=(1, 2, 3))
                best = np.maximum(best, np.maximum(p, -n))
        return best

    def accumulate(self, a: np.ndarray) -> np.ndarray:
        """The exact integer convolution of ``a`` (int64 [Cin, H, W] inside the validated bounds)
        plus the bias: int64 [Cout, Ho, Wo]. Computed with float64 GEMMs, exact here since every
        partial sum is an integer below 2**24."""
        cin, h, w = a.shape
        k, s, p = self.k, self.stride, self.padding
        x, wt = a.astype(np.float64), self.weight.astype(np.float64)
        ho, wo = self.out_hw(h, w)
        if self.transposed:
            cols = (wt.reshape(cin, -1).T @ x.reshape(cin, -1)).reshape(self.cout, k, k, h, w)
            full = np.zeros((self.cout, (h - 1) * s + k, (w - 1) * s + k))
            for ky in range(k):
                for kx in range(k):
                    full[:, ky:ky + (h - 1) * s + 1:s, kx:kx + (w - 1) * s + 1:s] += cols[:, ky, kx]
            acc = full[:, p:p + ho, p:p + wo]
        else:
            win = sliding_window_view(np.pad(x, ((0, 0), (p, p), (p, p))), (k, k), axis=(1, 2))[:, ::s, ::s]
            patches = np.ascontiguousarray(win.transpose(0, 3, 4, 1, 2)).reshape(cin * k * k, ho * wo)
            acc = (wt.reshape(self.cout, -1) @ patches).reshape(self.cout, ho, wo)
        bias = self.bias if self.bias.ndim == 3 else self.bias.reshape(-1, 1, 1)
        return acc.astype(np.int64) + bias

    def activate(self, acc: np.ndarray) -> np.ndarray:
        """Hidden layers: rounding shift, saturation at A, integer LeakyReLU (int64 in, int64 out)."""
        assert self.clip is not None
        s = self.shift.reshape(-1, 1, 1)
        r = np.minimum((acc + (np.int64(1) << (s - 1))) >> s, self.clip.reshape(-1, 1, 1))
        return np.where(r < 0, leaky(r, self.slope), r)


def leaky(r: np.ndarray, slope: int) -> np.ndarray:
    """``⌊r·slope·2^−SLOPE_BITS + ½⌋`` in int64 (what ``LeakyRelu``, ``+½``, ``Floor`` give for r < 0)."""
    return (np.asarray(r, np.int64) * slope + (1 << (SLOPE_BITS - 1))) >> SLOPE_BITS


@dataclass(frozen=True)
class IntHyperParams:
    """Everything the integer path needs (``hyper_int.npz``), validated."""

    layers: tuple[IntLayer, ...]
    in_shape: tuple[int, int, int]  # ẑ symbols [Cz, Hz, Wz]
    out_shape: tuple[int, int, int]  # y [C, H, W]
    z_clip: tuple[int, int]  # the symbols' clip (the z tables' support)
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
        except (KeyError, ValueError, TypeError, OverflowError) as exc:
            raise BundleError(f"{path}: invalid integer hyper parameters ({exc})") from exc

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict) -> IntHyperParams:
        """Build and validate every bound the exactness argument (module docstring) relies on."""
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            old = " (written by an older splitbits: re-export the bundle)" if version == 1 else ""
            raise ValueError(f"format version {version}, this runtime reads {FORMAT_VERSION}{old}")
        specs = meta["layers"]
        if not isinstance(specs, list) or not 1 <= len(specs) <= MAX_LAYERS:
            raise ValueError(f"1..{MAX_LAYERS} layers expected")
        in_shape = _shape3(meta["in_shape"], "in_shape")
        lo0, hi0 = (int(v) for v in meta["z_clip"])
        if not -MAX_CLIP <= lo0 <= 0 <= hi0 <= MAX_CLIP:
            raise ValueError(f"z_clip {lo0, hi0} must hold 0 and lie within ±{MAX_CLIP}")
        shape = in_shape
        lo = np.full(in_shape[0], lo0, np.int64)
        hi = np.full(in_shape[0], hi0, np.int64)
        layers = []
        for i, spec in enumerate(specs):
            layer = _layer(arrays, spec, i, shape, last=i == len(specs) - 1)
            lo, hi = check_layer(layer, i, lo, hi)
            shape = (layer.cout, *layer.out_hw(*shape[1:]))
            layers.append(layer)
        c = shape[0] // 2
        out_shape = (c, shape[1], shape[2])
        if _shape3(meta["out_shape"], "out_shape") != out_shape or shape[0] != 2 * c:
            raise ValueError(f"output {shape} does not give the scales and means of {meta['out_shape']}")
        return cls(tuple(layers), in_shape, out_shape, (lo0, hi0), meta)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The ``hyper_int.npz`` arrays (``meta`` as JSON)."""
        out: dict[str, np.ndarray] = {"meta": np.array(json.dumps(self.meta))}
        for i, layer in enumerate(self.layers):
            out.update({f"w{i}": layer.weight.astype(np.int32), f"b{i}": layer.bias, f"shift{i}": layer.shift})
            if layer.clip is not None:
                out[f"clip{i}"] = layer.clip
        return out

    def accumulate(self, z_symbols: np.ndarray) -> np.ndarray:
        """The final integer accumulator int64 [2C, H, W] for one ẑ symbol map [Cz, Hz, Wz] (the
        numpy reference of the graph)."""
        z = np.asarray(z_symbols)
        if z.shape != self.in_shape or z.dtype.kind not in "iu":
            raise ValueError(f"z symbols must be integers of shape {self.in_shape}, got {z.dtype} {z.shape}")
        a = np.clip(z.astype(np.int64), *self.z_clip)
        for layer in self.layers[:-1]:
            a = layer.activate(layer.accumulate(a))
        return self.layers[-1].accumulate(a)

    def reference(self, z_symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scales, means) float32 [C, H, W]: the accumulator times 2**−G, exact (what the graph outputs)."""
        acc = self.accumulate(z_symbols)
        out = np.ldexp(acc.astype(np.float64), -self.layers[-1].shift.reshape(-1, 1, 1)).astype(np.float32)
        c = self.out_shape[0]
        return out[:c], out[c:]

    def graph(self) -> bytes:
        """The ONNX model (opset 17) of this integer function, input ``z_symbols`` int32 [1, Cz, Hz, Wz],
        output ``hyper`` float32 [1, 2C, H, W] (scales then means): ``hyper_int.onnx``'s exact bytes."""
        return _build_graph(self)


def _shape3(value: Any, name: str) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in value)
    if len(shape) != 3 or min(shape) < 1 or max(shape) > 65535:
        raise ValueError(f"{name} must be 3 dimensions in 1..65535, got {value}")
    return shape  # type: ignore[return-value]


def _ints(arrays: dict[str, np.ndarray], key: str, shape: tuple[int, ...], lo: int, hi: int) -> np.ndarray:
    a = np.asarray(arrays[key])
    if a.dtype.kind not in "iu" or a.shape != shape:
        raise ValueError(f"{key}: integers of shape {shape} expected, got {a.dtype} {a.shape}")
    a = a.astype(np.int64)
    if a.size and (a.min() < lo or a.max() > hi):
        raise ValueError(f"{key}: values must lie in {lo}..{hi}")
    return a


def _layer(arrays: dict[str, np.ndarray], spec: dict, i: int, shape: tuple[int, int, int], last: bool) -> IntLayer:
    """Layer ``i`` (input ``shape``): shapes, dtypes and the ranges every value must lie in."""
    w = np.asarray(arrays[f"w{i}"])
    if w.ndim != 4 or w.shape[2] != w.shape[3] or not 1 <= w.shape[2] <= MAX_KERNEL:
        raise ValueError(f"layer {i}: weights must be [.., .., k, k] with k ≤ {MAX_KERNEL}")
    transposed = bool(spec["transposed"])
    w = _ints(arrays, f"w{i}", w.shape, -EXACT, EXACT)
    stride, padding = int(spec["stride"]), int(spec["padding"])
    cin, cout, k = w.shape[0 if transposed else 1], w.shape[1 if transposed else 0], w.shape[2]
    if cin != shape[0] or not 1 <= stride <= 8 or not 0 <= padding < k or cin * k * k > MAX_REDUCTION:
        raise ValueError(f"layer {i}: input channels, stride, padding or depth do not fit")
    probe = IntLayer(transposed, w, stride, padding, np.zeros(0, np.int64), np.zeros(0, np.int64), None, 0)
    ho, wo = probe.out_hw(*shape[1:])
    if ho < 1 or wo < 1:
        raise ValueError(f"layer {i}: empty output")
    bias = _ints(arrays, f"b{i}", (cout, ho, wo) if i == 0 else (cout,), -EXACT, EXACT)
    if last:
        shift = _ints(arrays, f"shift{i}", (cout,), -MAX_SHIFT, 100)
        return IntLayer(transposed, w, stride, padding, bias, shift, None, 0)
    shift = _ints(arrays, f"shift{i}", (cout,), 1, MAX_SHIFT)
    clip = _ints(arrays, f"clip{i}", (cout,), 1, MAX_CLIP)
    slope = int(spec["slope"])
    if not 0 <= slope < (1 << SLOPE_BITS):
        raise ValueError(f"layer {i}: slope outside [0, 1)")
    return IntLayer(transposed, w, stride, padding, bias, shift, clip, slope)


def check_layer(layer: IntLayer, i: int, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every partial sum (bias and rounding offset included) within 2**24, and for a hidden layer the
    LeakyReLU's products too (module docstring); returns the next layer's input range ``[lo, hi]``."""
    worst = layer.bound(lo, hi) + np.abs(layer.bias).reshape(layer.cout, -1).max(axis=1)
    if not layer.last:
        worst = worst + (np.int64(1) << (layer.shift - 1))
    if (worst > EXACT).any():
        c = int(np.argmax(worst))
        raise ValueError(f"layer {i}, channel {c}: partial sums reach {int(worst[c])} > 2**24 (not exact in float32)")
    if layer.clip is None:
        return lo, hi
    half = np.int64(1) << (layer.shift - 1)
    r_min = np.minimum((half - (worst - half)) >> layer.shift, 0)  # the lowest ⌊acc·2^−s + ½⌋ can go
    if (-r_min * layer.slope + (1 << (SLOPE_BITS - 1)) > EXACT).any():
        raise ValueError(f"layer {i}: LeakyReLU products r·slope beyond 2**24 (shift too small for the slope)")
    return leaky(r_min, layer.slope), layer.clip


# ---------------------------------------------------------------------------------------------
# the graph: a minimal ONNX protobuf writer (the runtime does not need the onnx package)
# ---------------------------------------------------------------------------------------------

_FLOAT, _INT32 = 1, 6  # TensorProto.DataType
_ATTR_FLOAT, _ATTR_INT, _ATTR_INTS = 1, 2, 7  # AttributeProto.AttributeType


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64: two's complement, ten bytes
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, value: int | bytes | str) -> bytes:
    """One protobuf field: an int as a varint, bytes/str/a message as length-delimited."""
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _attr(name: str, value: int | float | list[int]) -> bytes:
    if isinstance(value, list):
        return _field(1, name) + b"".join(_field(8, v) for v in value) + _field(20, _ATTR_INTS)
    if isinstance(value, float):
        return _field(1, name) + _varint(2 << 3 | 5) + struct.pack("<f", value) + _field(20, _ATTR_FLOAT)
    return _field(1, name) + _field(3, value) + _field(20, _ATTR_INT)


def _tensor(name: str, values: np.ndarray) -> bytes:
    """A float32 initializer; ``values`` (float64) must be float32 numbers (checked: nothing rounds)."""
    f32 = np.array(values, dtype="<f4", order="C")
    if not np.array_equal(f32.astype(np.float64), values):
        raise ValueError(f"initializer {name} is not exactly representable in float32")
    return b"".join(_field(1, d) for d in f32.shape) + _field(2, _FLOAT) + _field(8, name) + _field(9, f32.tobytes())


def _value_info(name: str, elem: int, dims: tuple[int, ...]) -> bytes:
    shape = b"".join(_field(1, _field(1, d)) for d in dims)
    return _field(1, name) + _field(2, _field(1, _field(1, elem) + _field(2, shape)))


class _Graph:
    """Nodes and initializers in the order they are added (so the bytes are deterministic)."""

    def __init__(self) -> None:
        self.nodes: list[bytes] = []
        self.inits: list[bytes] = []
        self.n = 0

    def const(self, name: str, values: Any) -> str:
        self.inits.append(_tensor(name, np.asarray(values, np.float64)))
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        self.n += 1
        out = out or f"t{self.n}"
        body = b"".join(_field(1, x) for x in inputs) + _field(2, out) + _field(3, f"n{self.n}_{op}") + _field(4, op)
        self.nodes.append(body + b"".join(_field(5, _attr(k, v)) for k, v in attrs.items()))
        return out


def _build_graph(p: IntHyperParams) -> bytes:
    g = _Graph()
    x = g.node("Cast", ["z_symbols"], to=_FLOAT)
    x = g.node("Clip", [x, g.const("z_lo", p.z_clip[0]), g.const("z_hi", p.z_clip[1])])
    for i, layer in enumerate(p.layers):
        x = _layer_nodes(g, i, layer, x)
    c2 = 2 * p.out_shape[0]
    graph = (b"".join(_field(1, n) for n in g.nodes) + _field(2, "splitbits_hyper_int")
             + b"".join(_field(5, t) for t in g.inits)
             + _field(11, _value_info("z_symbols", _INT32, (1, *p.in_shape)))
             + _field(12, _value_info("hyper", _FLOAT, (1, c2, *p.out_shape[1:]))))
    return (_field(1, 8) + _field(2, "splitbits") + _field(3, str(FORMAT_VERSION)) + _field(7, graph)
            + _field(8, _field(1, "") + _field(2, OPSET)))


def _layer_nodes(g: _Graph, i: int, layer: IntLayer, x: str) -> str:
    """One layer's nodes (module docstring); returns its output's name."""
    scale = np.exp2(-layer.shift.astype(np.float64))
    wshape = (1, -1, 1, 1) if layer.transposed else (-1, 1, 1, 1)
    w = g.const(f"w{i}", layer.weight * scale.reshape(wshape))
    half = 0.0 if layer.last else 0.5
    op = "ConvTranspose" if layer.transposed else "Conv"
    conv = {"kernel_shape": [layer.k] * 2, "strides": [layer.stride] * 2, "pads": [layer.padding] * 4}
    if layer.bias.ndim == 3:  # the first layer's medians map: an Add after the convolution
        v = g.node(op, [x, w], **conv)
        v = g.node("Add", [v, g.const(f"b{i}", (layer.bias * scale.reshape(-1, 1, 1) + half)[None])],
                   "hyper" if layer.last else None)
    else:
        v = g.node(op, [x, w, g.const(f"b{i}", layer.bias * scale + half)], "hyper" if layer.last else None, **conv)
    if layer.clip is None:
        return v
    v = g.node("Floor", [v])
    v = g.node("Min", [v, g.const(f"clip{i}", layer.clip.reshape(1, -1, 1, 1))])
    v = g.node("LeakyRelu", [v], alpha=layer.slope / (1 << SLOPE_BITS))
    v = g.node("Add", [v, g.const(f"half{i}", 0.5)])
    return g.node("Floor", [v])


# ---------------------------------------------------------------------------------------------
# running it
# ---------------------------------------------------------------------------------------------


class IntHyperSession:
    """``hyper_int.onnx`` on ONNX Runtime's CPU provider, then the scale indexes by lookup."""

    def __init__(self, params: IntHyperParams, graph: bytes, scale_table: np.ndarray, scale_bound: float,
                 threads: int = 0) -> None:
        import onnxruntime as ort

        from splitbits.runtime.scale_index import ScaleIndex

        if graph != params.graph():
            raise BundleError("hyper_int.onnx is not the graph of hyper_int.npz (re-export the bundle)")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = max(0, int(threads))
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.add_session_config_entry("mlas.enable_gemm_fastmath_arm64_bfloat16", "0")  # fp32 GEMMs only
        try:
            self._sess = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types
            raise BundleError(f"ONNX Runtime could not load hyper_int.onnx ({exc})") from exc
        self.params = params
        self.index = ScaleIndex(scale_table, scale_bound)
        self._c, self._shape, self._out = params.out_shape[0], params.in_shape, ["hyper"]

    def outputs(self, z_symbols: np.ndarray) -> np.ndarray:
        """The graph's output float32 [2C, H, W] (scales, then means) for one ẑ symbol map."""
        z = z_symbols
        if not (isinstance(z, np.ndarray) and z.dtype == np.int32 and z.shape == self._shape):
            z = np.asarray(z)
            if z.shape != self._shape or z.dtype.kind not in "iu":
                raise ValueError(f"z symbols must be integers of shape {self._shape}, got {z.dtype} {z.shape}")
            z = np.clip(z, *self.params.z_clip).astype(np.int32)  # clip first: a wider integer must not wrap
        return self._sess.run(self._out, {"z_symbols": z[None]})[0][0]

    def index_means(self, z_symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(idx int32 [C, H, W], means float32 [C, H, W]) for one image's ẑ symbols."""
        out = self.outputs(z_symbols)
        return self.index(out[: self._c]), out[self._c:]
