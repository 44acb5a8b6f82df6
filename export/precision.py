"""The ONNX side of reduced-precision engines, testable without TensorRT.

* :func:`find_gdn` finds GDN / IGDN layers in an exported graph by their pattern: a square (``Mul(x,
  x)``, ``Pow(x, 2)``) or ``Abs(x)`` feeding a ``Conv`` with γ/β, then a chain of element-wise ops
  (``Add``, ``Sqrt``, ``Reciprocal``, ...) ending in ``Mul``/``Div`` with ``x`` again. GDN squares
  its input and overflows FP16 above |x|≈256, so these run in FP32.
* :func:`plan_fp32` adds what feeds the entropy model: in the head, the layers that produce the
  latents and everything computed from them (h_a); the whole hyper graph (its scales choose the
  CDFs, which must match the server bit for bit). The tail has only its IGDNs pinned.
* :func:`to_mixed_fp16` writes that plan into the ONNX itself (FP16 everywhere else, casts at the
  borders) — what a strongly typed TensorRT network (TensorRT 11, or 10 on request) builds from.
* :func:`quantize_qdq` inserts explicit INT8 Q/DQ pairs (symmetric, per-channel weights, bias left
  in float) with ONNX Runtime's ``quantize_static`` and a calibration set, excluding the pinned
  nodes — TensorRT builds an explicitly quantised engine from it (no deprecated calibrators).
* :func:`profile_shapes`, :func:`check_onnx`: batch profiles and the opset ≤ 20 check.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

MAX_OPSET = 20  # TensorRT 10.3's ONNX parser
_ELEMENTWISE = {"Add", "Sqrt", "Reciprocal", "Mul", "Div", "Pow", "Max", "Clip", "Identity"}
#: op types ``quantize_qdq`` quantises (TensorRT fuses Q/DQ around these)
QDQ_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class GdnMatch:
    name: str
    kind: str  # "GDN" (divides by the norm) or "IGDN" (multiplies)
    source: str  # the tensor x being normalised
    output: str
    nodes: list[str]


@dataclass
class PinPlan:
    """Which nodes of one graph keep FP32, and why."""

    graph: str
    gdn: list[GdnMatch] = field(default_factory=list)
    entropy: list[str] = field(default_factory=list)
    all_fp32: bool = False
    nodes: set[str] = field(default_factory=set)
    tensors: set[str] = field(default_factory=set)

    def summary(self) -> dict[str, Any]:
        return {"graph": self.graph, "all_fp32": self.all_fp32, "gdn": [f"{g.kind} {g.name}" for g in self.gdn],
                "entropy_feeders": sorted(self.entropy), "fp32_nodes": len(self.nodes)}


class _Graph:
    """Producer/consumer indexes of an ONNX graph (node names must be unique and non-empty)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.nodes = {n.name: n for n in g.node}
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in g.initializer}
        self.inputs = {i.name for i in g.input} - set(self.inits)
        self.outputs = [o.name for o in g.output]

    def const_value(self, tensor: str) -> np.ndarray | None:
        if tensor in self.inits:
            return numpy_helper.to_array(self.inits[tensor])
        p = self.producer.get(tensor)
        if p is not None and p.op_type == "Constant":
            for a in p.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def is_const(self, tensor: str) -> bool:
        return tensor in self.inits or (tensor in self.producer and self.producer[tensor].op_type == "Constant")

    def ancestors(self, tensors: Iterable[str], stop: set[str]) -> set[str]:
        """Names of nodes that (transitively) produce ``tensors``, not crossing ``stop`` tensors."""
        out: set[str] = set()
        todo = [t for t in tensors if t not in stop]
        while todo:
            t = todo.pop()
            p = self.producer.get(t)
            if p is None or p.name in out:
                continue
            out.add(p.name)
            todo.extend(i for i in p.input if i and i not in stop)
        return out

    def descendants(self, tensors: Iterable[str]) -> set[str]:
        out: set[str] = set()
        todo = list(tensors)
        while todo:
            for n in self.consumers.get(todo.pop(), []):
                if n.name not in out:
                    out.add(n.name)
                    todo.extend(n.output)
        return out


def ensure_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed (or duplicate-named) node a unique name, in place; returns the model."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_splitbits_{i}"
        seen.add(n.name)
    return model


def _square_source(g: _Graph, node: onnx.NodeProto | None) -> str | None:
    """``x`` when ``node`` is Mul(x, x), Pow(x, 2) or Abs(x)."""
    if node is None:
        return None
    if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]:
        return node.input[0]
    if node.op_type == "Pow":
        e = g.const_value(node.input[1])
        if e is not None and e.size == 1 and float(e.reshape(-1)[0]) == 2.0:
            return node.input[0]
    if node.op_type == "Abs":
        return node.input[0]
    return None


def find_gdn(model: onnx.ModelProto, max_chain: int = 6) -> list[GdnMatch]:
    """Every GDN/IGDN of ``model`` (see the module docstring for the pattern)."""
    ensure_node_names(model)
    g = _Graph(model)
    found = []
    for conv in model.graph.node:
        if conv.op_type != "Conv" or len(conv.input) < 2:
            continue
        sq = g.producer.get(conv.input[0])
        x = _square_source(g, sq)
        if x is None or sq is None:
            continue
        chain: list[onnx.NodeProto] = []
        t = conv.output[0]
        final = None
        for _ in range(max_chain):
            cons = g.consumers.get(t, [])
            hit = [n for n in cons if n.op_type in ("Mul", "Div") and x in n.input and t in n.input]
            if hit:
                final = hit[0]
                break
            if len(cons) != 1 or cons[0].op_type not in _ELEMENTWISE:
                break
            n = cons[0]
            if any(i != t and i and not g.is_const(i) for i in n.input):
                break
            chain.append(n)
            t = n.output[0]
        if final is None:
            continue
        ops = [n.op_type for n in chain]
        # x / norm, x · Reciprocal(norm), x · (c / norm) or x · norm^-k all divide: a GDN; else IGDN
        divides = (final.op_type == "Div" and final.input[0] == x) or "Reciprocal" in ops or any(
            (n.op_type == "Pow" and (v := g.const_value(n.input[1])) is not None and float(v.reshape(-1)[0]) < 0)
            or (n.op_type == "Div" and g.is_const(n.input[0])) for n in chain)
        members = {sq.name, conv.name, final.name, *(n.name for n in chain)}
        members |= g.ancestors(conv.input[1:], stop={x})
        for n in chain:
            members |= {g.producer[i].name for i in n.input if i in g.producer and g.is_const(i)}
        names = sorted(members)
        prefix = _common_prefix([conv.name, final.name, sq.name])
        found.append(GdnMatch(prefix or conv.name, "GDN" if divides else "IGDN", x, final.output[0], names))
    return found


def _common_prefix(names: Sequence[str]) -> str:
    parts = [n.split("/") for n in names]
    common = []
    for seg in zip(*parts):
        if len(set(seg)) != 1:
            break
        common.append(seg[0])
    return "/".join(common).rstrip("/")


def plan_fp32(model: onnx.ModelProto, graph: str) -> PinPlan:
    """The FP32 plan of one bundle graph (``head``, ``hyper`` or ``tail``)."""
    ensure_node_names(model)
    g = _Graph(model)
    plan = PinPlan(graph, gdn=find_gdn(model))
    if graph == "hyper":
        plan.all_fp32 = True
        plan.nodes = set(g.nodes)
    else:
        for m in plan.gdn:
            plan.nodes.update(m.nodes)
        if graph == "head":
            feeders = {g.producer[o].name for o in g.outputs if o in g.producer}
            feeders |= g.descendants(g.outputs)
            plan.entropy = sorted(feeders)
            plan.nodes |= feeders
    plan.tensors = {o for name in plan.nodes for o in g.nodes[name].output if o}
    return plan


def to_mixed_fp16(model: onnx.ModelProto, plan: PinPlan) -> onnx.ModelProto:
    """FP16 everywhere except ``plan.nodes`` (FP32), inputs/outputs kept FP32, casts at the borders."""
    if plan.all_fp32:
        return model
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:  # pragma: no cover - ships with every onnxruntime wheel
        raise RuntimeError("mixed FP16 conversion needs onnxruntime's transformers.float16 helper") from exc
    m = copy.deepcopy(model)
    ensure_node_names(m)
    return convert_float_to_float16(m, keep_io_types=True, node_block_list=sorted(plan.nodes),
                                    disable_shape_infer=False)


class ArrayReader:
    """An ONNX Runtime ``CalibrationDataReader`` over a list of feed dicts."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def quantize_qdq(model_path: str | Path, out_path: str | Path, feeds: Sequence[dict[str, np.ndarray]],
                 exclude: Iterable[str], *, per_channel: bool = True) -> dict[str, Any]:
    """Write an explicitly quantised (Q/DQ, INT8, symmetric) copy of ``model_path`` to ``out_path``.

    ``feeds`` is the calibration set (feed dicts for the graph's input); ``exclude`` are node names
    left in float (GDN and what feeds the entropy model). Returns counts for the report.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not feeds:
        raise ValueError("INT8 calibration needs at least one calibration batch")
    model = ensure_node_names(onnx.load(str(model_path)))
    named = Path(out_path).with_suffix(".named.onnx")
    onnx.save(model, str(named))

    class Reader(ArrayReader, CalibrationDataReader):
        pass

    excluded = sorted(set(exclude))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static warns on the root logger about pre-processing we skip on purpose
    try:
        quantize_static(
            str(named), str(out_path), Reader(feeds), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QDQ_OP_TYPES), per_channel=per_channel,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
        )
    finally:
        root.setLevel(level)
        named.unlink(missing_ok=True)
    q = onnx.load(str(out_path))
    ops = [n.op_type for n in q.graph.node]
    quantised = sorted({n.name for n in q.graph.node if n.op_type in QDQ_OP_TYPES
                        and any(_dq_input(q, i) for i in n.input[:1])})
    return {"quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear"),
            "quantised_nodes": quantised, "excluded_nodes": len(excluded), "calibration_batches": len(feeds)}


def _dq_input(model: onnx.ModelProto, tensor: str) -> bool:
    return any(n.op_type == "DequantizeLinear" and tensor in n.output for n in model.graph.node)


def onnx_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def input_dims(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Graph inputs (initializers excluded) → dims (int, or the symbolic name of a dynamic one)."""
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        dims: list[int | str] = []
        for d in i.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
        out[i.name] = dims
    return out


def check_onnx(model: onnx.ModelProto) -> dict[str, Any]:
    """opset (≤ 20 for TensorRT 10.3), inputs and which of their dims are dynamic."""
    opset = onnx_opset(model)
    dims = input_dims(model)
    dynamic = {n: [k for k, d in enumerate(ds) if not isinstance(d, int) or d <= 0] for n, ds in dims.items()}
    problems = []
    if opset > MAX_OPSET:
        problems.append(f"opset {opset} > {MAX_OPSET} (TensorRT 10.3's parser)")
    for n, axes in dynamic.items():
        if any(a != 0 for a in axes):
            problems.append(f"input {n} has dynamic non-batch axes {axes}; re-export with static shapes")
    return {"opset": opset, "inputs": dims, "dynamic_axes": dynamic, "problems": problems}


def profile_shapes(dims: Sequence[int | str], max_batch: int, opt_batch: int | None = None
                   ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """(min, opt, max) shapes of an input for an optimisation profile; ``None`` if fully static.

    Only the batch axis may be dynamic: min 1, opt ``opt_batch`` (default ``max_batch``), max
    ``max_batch``.
    """
    if max_batch < 1:
        raise ValueError("max batch must be at least 1")
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise ValueError(f"opt batch {opt} must lie in 1..{max_batch}")
    dyn = [k for k, d in enumerate(dims) if not isinstance(d, int) or d <= 0]
    if not dyn:
        return None
    if dyn != [0]:
        raise ValueError(f"only the batch axis may be dynamic, got dynamic axes {dyn} in {list(dims)}")
    rest = tuple(int(d) for d in dims[1:])
    return (1, *rest), (opt, *rest), (max_batch, *rest)
