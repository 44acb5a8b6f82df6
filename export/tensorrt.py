"""``splitbits export BUNDLE --trt``: TensorRT engines for a bundle's ``head``, ``hyper`` and ``tail``.

Written against the TensorRT 10 Python API (JetPack 6.1/6.2: 10.3) and TensorRT 11; TensorRT < 10
(JetPack 6.0: 8.6) is refused (``runtime.backends.tensorrt.check_tensorrt_version``):

* ``trt.Builder`` → ``create_network(flags)`` (explicit batch is the only mode from 10 on; 10.x gets
  ``1 << STRONGLY_TYPED`` when the precision lives in the ONNX types, 11 nothing: every network is
  strongly typed and the flag is deprecated there) → ``trt.OnnxParser.parse_from_file`` → builder
  config: ``set_memory_pool_limit(WORKSPACE)``, an optimisation profile for the dynamic batch axis
  (min 1, opt, max), a timing cache loaded from and saved beside the engines (``set_timing_cache``'s
  refusal is an error), TF32 cleared so FP32 layers are real FP32 → ``build_serialized_network``.
* Precision (:func:`choose_typing`). *Weak typing*, TensorRT 10.0–10.11 only, their default for
  fp32/fp16: ``BuilderFlag.FP16`` plus ``OBEY_PRECISION_CONSTRAINTS`` with the GDN layers and
  everything feeding the entropy model pinned to FP32 (``layer.precision``, ``set_output_type``).
  *Strong typing*, the default from 10.12 (where those APIs are deprecated; 11 removed them) or with
  ``--strongly-typed``: the same plan written into the ONNX as a mixed FP16 model
  (``export.precision.to_mixed_fp16``). INT8 is always explicit quantisation: a Q/DQ ONNX calibrated
  on the dataset (``export.precision.quantize_qdq``), built strongly typed — no deprecated calibrators.
* ``hyper`` is always FP32: its scales choose the CDFs and must match the server bit for bit.
* Engines are named by device, TensorRT version and precision
  (``engines/head.nvidia-jetson-agx-orin-developer-kit.trt10.3.0.fp16.engine``), listed in the
  manifest under ``"engines"`` with their sha256 (outside the model fingerprint, so packets stay
  compatible), and verified against ``golden/`` (tolerances on tensors per precision, exact
  symbols except INT8, where differences are counted and reported).

``--onnx-only`` prepares the same ONNX (mixed FP16 / Q/DQ) and checks it with ONNX Runtime on the
CPU against ``golden/`` — what CI runs where TensorRT is absent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from splitbits.export.precision import PinPlan, check_onnx, plan_fp32, profile_shapes, quantize_qdq, to_mixed_fp16
from splitbits.runtime.backends.base import Backend
from splitbits.runtime.backends.onnxruntime import OrtBackend
from splitbits.runtime.backends.tensorrt import (
    ENGINE_DIR,
    INT8_MIN_TOP1,
    PRECISIONS,
    check_tensorrt_version,
    engine_filename,
    engine_key,
    import_tensorrt,
    jetson_model,
    load_cuda,
    slugify,
    timing_cache_filename,
    version_tuple,
)
from splitbits.runtime.backends.tensorrt import TOLERANCES as TRT_TOLERANCES
from splitbits.runtime.bundle import MANIFEST, Bundle, load_bundle, sha256_file
from splitbits.runtime.errors import BackendError, BundleError
from splitbits.runtime.report import write_json
from splitbits.runtime.verify import Tolerance, VerifyReport, verify_bundle

log = logging.getLogger(__name__)

#: tensor tolerances per engine precision (symbols are exact except for INT8)
TOLERANCES = {p: Tolerance(atol=a, rtol=r) for p, (a, r) in TRT_TOLERANCES.items()}


#: weak typing (precision builder flags, layer precisions) is deprecated from this TensorRT on
WEAK_TYPING_DEPRECATED = (10, 12)


class TensorRTUnavailable(BackendError):
    """TensorRT (or CUDA) is not installed here, or too old."""


class EngineBuildError(BackendError):
    """TensorRT could not parse the ONNX or build the engine."""


@dataclass
class TrtBuildOptions:
    precision: str = "fp16"
    max_batch: int = 1
    opt_batch: int | None = None
    workspace_mib: int = 1024
    graphs: list[str] | None = None
    strongly_typed: bool | None = None
    onnx_only: bool = False
    dataset: str = "builtin"
    calib_count: int = 64
    calib_split: str = "train"
    calib_inputs: str | None = None
    tol: Tolerance | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}")
        if self.max_batch < 1 or self.workspace_mib < 16 or self.calib_count < 1:
            raise ValueError("max batch ≥ 1, workspace ≥ 16 MiB and calibration count ≥ 1 please")
        if self.opt_batch is not None and not 1 <= self.opt_batch <= self.max_batch:
            raise ValueError("opt batch must lie in 1..max batch")


@dataclass
class GraphBuild:
    graph: str
    precision: str
    typing: str
    onnx: str
    plan: dict[str, Any]
    quantisation: dict[str, Any] | None = None
    engine: str | None = None
    engine_bytes: int = 0
    pinned_layers: int = 0
    seconds: float = 0.0


@dataclass
class BuildResult:
    bundle: str
    mode: str  # "tensorrt" or "onnx-only"
    precision: str
    device: str | None
    tensorrt: str | None
    graphs: list[GraphBuild] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    ok: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def report_lines(self) -> list[str]:
        """What ``export --trt`` prints: a line per graph, the verification, what differed."""
        v = self.verification or {}
        lines = [f"{gb.graph:5s} {gb.precision} ({gb.typing} typing) {gb.engine or gb.onnx}  "
                 f"FP32 nodes {gb.plan['fp32_nodes']}"
                 + (f", pinned layers {gb.pinned_layers}" if gb.engine else "")
                 + (f", Q/DQ nodes {len(gb.quantisation['quantised_nodes'])}" if gb.quantisation else "")
                 for gb in self.graphs]
        where = (f"TensorRT {self.tensorrt} on {self.device}" if self.mode == "tensorrt"
                 else "ONNX Runtime CPU (prepared ONNX)")
        lines.append(f"verification on {where}: {'OK' if self.ok else 'FAILED'}  top-1 {v.get('top1_agree')}/"
                     f"{v.get('images')}  max errors "
                     + ", ".join(f"{k}={e:.2g}" for k, e in v.get("max_abs_err", {}).items()))
        if v.get("symbol_mismatches"):
            lines.append("symbols differing from golden (reported, INT8): "
                         + ", ".join(f"{k}={n}" for k, n in v["symbol_mismatches"].items()))
        lines += [f"  mismatch: {problem}" for problem in v.get("problems", [])]
        return lines


# --------------------------------------------------------------------------------------------
# pure decisions (tested without TensorRT)
# --------------------------------------------------------------------------------------------


def graph_precision(graph: str, requested: str) -> str:
    """``hyper`` stays FP32 whatever is asked (its indexes must match the server's bit for bit)."""
    return "fp32" if graph == "hyper" else requested


def choose_typing(trt_version: str, has_weak_flags: bool, precision: str, requested: bool | None) -> str:
    """``"strong"`` or ``"weak"``. Weak typing only on TensorRT 10.0–10.11, where it is the default for
    FP32/FP16; from 10.12 (weak typing deprecated there, removed in 11) and for INT8 (Q/DQ) every
    build is strongly typed; ``requested`` (``--strongly-typed``/``--weakly-typed``) overrides within
    that. TensorRT < 10 is refused (:class:`BackendError`)."""
    check_tensorrt_version(trt_version)
    weak_possible = has_weak_flags and version_tuple(trt_version)[:2] < WEAK_TYPING_DEPRECATED
    if requested is True:
        return "strong"
    if requested is False:
        if not weak_possible:
            raise EngineBuildError(
                f"TensorRT {trt_version} builds strongly typed only: weak typing (BuilderFlag.FP16, layer "
                "precisions) is deprecated in TensorRT 10.12 and removed in 11; drop --weakly-typed")
        return "weak"
    if precision == "int8" or not weak_possible:
        return "strong"
    return "weak"


def onnx_names_of_layer(name: str, metadata: str | None) -> set[str]:
    """ONNX node names a TensorRT layer came from: its name and every ``[ONNX Layer: X]`` in its metadata."""
    names = {name}
    if metadata:
        names |= {m.strip() for m in re.findall(r"\[ONNX Layer: ([^|\]\x1f]+)", metadata)}
    return names


def layer_is_pinned(name: str, metadata: str | None, output_names: list[str], plan: PinPlan) -> bool:
    """A TensorRT layer belongs to the FP32 plan if its ONNX origin or one of its outputs does."""
    return bool(onnx_names_of_layer(name, metadata) & plan.nodes) or any(o in plan.tensors for o in output_names)


# --------------------------------------------------------------------------------------------
# ONNX preparation and calibration
# --------------------------------------------------------------------------------------------


def calibration_feeds(bundle: Bundle, graphs: list[str], images: np.ndarray, batch: int = 8
                      ) -> dict[str, list[dict[str, np.ndarray]]]:
    """Feed dicts per graph for INT8 calibration: preprocessed images for ``head``, the decoded ŷ
    the server would feed the ``tail`` (computed here in FP32 with ONNX Runtime)."""
    from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder, preprocess

    x = preprocess(images, bundle.input_shape)
    feeds: dict[str, list[dict[str, np.ndarray]]] = {}
    if "head" in graphs:
        feeds["head"] = [{"x": x[i:i + batch]} for i in range(0, len(x), batch)]
    if "tail" in graphs:
        enc, dec = EdgeEncoder(bundle, "onnxruntime"), ServerDecoder(bundle, "onnxruntime")
        y_hat = np.stack([dec.decode_latent(enc.encode(x[i]))[0] for i in range(len(x))])
        feeds["tail"] = [{"y_hat": y_hat[i:i + batch]} for i in range(0, len(y_hat), batch)]
    return feeds


def _calibration_images(bundle: Bundle, opts: TrtBuildOptions) -> np.ndarray:
    from splitbits.runtime.inputs import load_inputs

    inputs = load_inputs(bundle.input_shape, dataset=opts.dataset, split=opts.calib_split, limit=opts.calib_count,
                         inputs=opts.calib_inputs)
    return inputs.images


def prepare_onnx(bundle: Bundle, graph: str, precision: str, typing: str,
                 calib: dict[str, list[dict[str, np.ndarray]]] | None) -> tuple[Path, PinPlan, dict | None]:
    """The ONNX TensorRT builds ``graph`` from, its FP32 plan, and Q/DQ statistics (INT8)."""
    src = bundle.graph(graph)
    model = onnx.load(str(src))
    chk = check_onnx(model)
    if chk["problems"]:
        raise EngineBuildError(f"{src}: " + "; ".join(chk["problems"]))
    plan = plan_fp32(model, graph)
    out_dir = bundle.path / ENGINE_DIR
    out_dir.mkdir(exist_ok=True)
    if precision == "fp32" or (precision == "fp16" and typing == "weak"):
        return src, plan, None
    if precision == "fp16":
        dst = out_dir / f"{graph}.fp16-mixed.onnx"
        onnx.save(to_mixed_fp16(model, plan), str(dst))
        return dst, plan, None
    if not calib or graph not in calib:
        raise EngineBuildError(f"INT8 {graph}: no calibration data")
    dst = out_dir / f"{graph}.int8-qdq.onnx"
    stats = quantize_qdq(src, dst, calib[graph], plan.nodes)
    return dst, plan, stats


class PreparedOrtBackend(OrtBackend):
    """ONNX Runtime (CPU) running prepared ONNX files in place of the bundle's graphs."""

    name = "onnxruntime-prepared"

    def __init__(self, files: dict[str, Path]) -> None:
        super().__init__(providers=["cpu"])
        self.files = files

    def graph_path(self, bundle: Bundle, graph: str) -> Path:
        return self.files.get(graph, bundle.graph(graph))

    def describe(self) -> dict[str, str]:
        d = super().describe()
        d["graphs"] = ",".join(f"{g}={Path(p).name}" for g, p in sorted(self.files.items()))
        return d


# --------------------------------------------------------------------------------------------
# TensorRT
# --------------------------------------------------------------------------------------------


def device_name(cuda: Any = None) -> str:
    """The board name on a Jetson, else the CUDA device's name."""
    return jetson_model() or (cuda or load_cuda()).device_name()


def pin_layers(trt: Any, network: Any, plan: PinPlan) -> int:
    """Pin the layers of ``plan`` to FP32 (precision and float outputs); returns how many."""
    floats = {trt.float32, trt.float16}
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = [layer.get_output(k) for k in range(layer.num_outputs)]
        if not layer_is_pinned(layer.name, getattr(layer, "metadata", None), [o.name for o in outs], plan):
            continue
        float_outs = [k for k, o in enumerate(outs) if o.dtype in floats]
        if not float_outs:
            continue  # shape / index layers
        layer.precision = trt.float32
        for k in float_outs:
            layer.set_output_type(k, trt.float32)
        count += 1
    return count


def build_engine(trt: Any, onnx_path: Path, plan: PinPlan, precision: str, typing: str, opts: TrtBuildOptions,
                 cache_path: Path, logger: Any = None) -> tuple[Any, int]:
    """Parse and build one engine; returns (serialised engine, number of FP32-pinned layers)."""
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0  # explicit batch: the only mode from TensorRT 10 on
    if typing == "strong" and version_tuple(str(trt.__version__))[0] < 11:  # 11: always strongly typed
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT could not parse {onnx_path.name}: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # FP32 layers stay IEEE FP32 (entropy model inputs)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineBuildError(f"TensorRT refused the timing cache {cache_path} (made on another GPU or by "
                               "another TensorRT build?): delete it and build again")
    profile = None
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shapes = profile_shapes(list(inp.shape), opts.max_batch, opts.opt_batch)
        if shapes is not None:
            profile = profile or builder.create_optimization_profile()
            profile.set_shape(inp.name, *shapes)
    if profile is not None:
        config.add_optimization_profile(profile)
    pinned = 0
    if typing == "weak" and precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = pin_layers(trt, network, plan)
        if plan.nodes and pinned == 0:
            raise EngineBuildError(f"{onnx_path.name}: none of the {len(plan.nodes)} FP32 nodes matched a "
                                   "TensorRT layer; refusing an FP16 engine with unpinned GDN")
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise EngineBuildError(f"TensorRT failed to build {onnx_path.name} ({precision}, {typing} typing)")
    cache_path.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return engine, pinned


class EnginesUnderTest(Backend):
    """TensorRT for the graphs just built, ONNX Runtime (CPU) for the bundle's other graphs, so a
    partial build (``--graphs tail``) is verified end to end too."""

    name = "tensorrt"

    def __init__(self, trt_backend: Backend, graphs: list[str]) -> None:
        self.trt_backend, self.graphs = trt_backend, set(graphs)
        self.ort = OrtBackend()

    def load(self, bundle: Bundle, graph: str):
        return (self.trt_backend if graph in self.graphs else self.ort).load(bundle, graph)

    def describe(self) -> dict[str, str]:
        return {**self.trt_backend.describe(), "built": ",".join(sorted(self.graphs))}


def register_engines(bundle_path: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Add engine entries to the manifest (atomically: the bundle stays loadable if the build is
    interrupted); files and fingerprint are untouched."""
    mpath = bundle_path / MANIFEST
    manifest = json.loads(mpath.read_text())
    manifest.setdefault("engines", {}).update(entries)
    write_json(mpath, manifest, atomic=True)


def _verify(bundle_path: Path, backend: Any, precision: str, tol: Tolerance | None) -> VerifyReport:
    return verify_bundle(load_bundle(bundle_path), backend, tol=tol or TOLERANCES[precision], raise_on_fail=False,
                         exact_symbols=precision != "int8", min_top1=INT8_MIN_TOP1)


@dataclass
class _Prepared:
    """One graph ready for the builder: its ONNX, FP32 plan, precision and typing."""

    path: Path
    plan: PinPlan
    precision: str
    typing: str


def _prepare_graphs(bundle: Bundle, graphs: list[str], opts: TrtBuildOptions, version: str | None,
                    has_weak: bool, result: BuildResult) -> dict[str, _Prepared]:
    """The ONNX of every graph (mixed FP16 / Q/DQ where asked), each listed in ``result.graphs``."""

    def typing_of(precision: str) -> str:
        if version is None:  # onnx-only: check what a strongly typed build consumes
            return "strong" if precision != "fp32" else "any"
        return choose_typing(version, has_weak, precision, opts.strongly_typed)

    calib = None
    if opts.precision == "int8":
        calib = calibration_feeds(bundle, [g for g in graphs if graph_precision(g, "int8") == "int8"],
                                  _calibration_images(bundle, opts))
    prepared: dict[str, _Prepared] = {}
    for g in graphs:
        prec = graph_precision(g, opts.precision)
        typing = typing_of(prec)
        path, plan, stats = prepare_onnx(bundle, g, prec, typing, calib)
        prepared[g] = _Prepared(path, plan, prec, typing)
        result.graphs.append(GraphBuild(g, prec, typing, os.path.relpath(path, bundle.path), plan.summary(), stats))
    return prepared


def _build_all(trt: Any, bundle_path: Path, prepared: dict[str, _Prepared], opts: TrtBuildOptions, device: str,
               version: str, result: BuildResult) -> dict[str, dict[str, Any]]:
    """Build and write every engine of ``result.graphs``; their manifest entries by engine key."""
    from splitbits.runtime.progress import progress_bar

    slug = slugify(device)
    cache_path = bundle_path / timing_cache_filename(slug, version)
    logger = trt.Logger(trt.Logger.WARNING)
    entries: dict[str, dict[str, Any]] = {}
    with progress_bar(len(result.graphs), "building engines", disabled=not opts.progress) as bar:
        for gb in result.graphs:
            p = prepared[gb.graph]
            t = time.perf_counter()
            engine, pinned = build_engine(trt, p.path, p.plan, p.precision, p.typing, opts, cache_path, logger)
            rel = engine_filename(gb.graph, slug, version, p.precision)
            (bundle_path / rel).write_bytes(engine)
            gb.engine, gb.pinned_layers = rel, pinned
            gb.engine_bytes = (bundle_path / rel).stat().st_size
            gb.seconds = time.perf_counter() - t
            entries[engine_key(gb.graph, slug, version, p.precision)] = {
                "graph": gb.graph, "file": rel, "sha256": sha256_file(bundle_path / rel), "bytes": gb.engine_bytes,
                "device": device, "device_slug": slug, "tensorrt": version, "precision": p.precision,
                "requested_precision": opts.precision, "typing": p.typing, "onnx": gb.onnx,
                "max_batch": opts.max_batch, "opt_batch": opts.opt_batch or opts.max_batch,
                "workspace_mib": opts.workspace_mib, "fp32_layers": pinned, "plan": gb.plan,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            bar.advance()
    return entries


def build_engines(bundle_path: str | Path, opts: TrtBuildOptions, *, trt: Any = None, cuda: Any = None) -> BuildResult:
    """Prepare, build, register and verify the engines of a bundle (or only prepare and check the
    ONNX with ``opts.onnx_only``). ``trt``/``cuda`` are injectable for tests."""
    t0 = time.perf_counter()
    bundle_path = Path(bundle_path)
    bundle = load_bundle(bundle_path)
    graphs = opts.graphs or list(bundle.manifest["graphs"])
    unknown = [g for g in graphs if g not in bundle.manifest["graphs"]]
    if unknown:
        raise BundleError(f"bundle {bundle_path} has no graphs {unknown}")
    if not opts.onnx_only and trt is None:
        try:
            trt = import_tensorrt()
        except BackendError as exc:
            raise TensorRTUnavailable(f"{exc}. Without TensorRT, --onnx-only prepares the same ONNX and checks "
                                      "it with ONNX Runtime") from exc
    version = str(trt.__version__) if trt is not None else None
    if version is not None:
        check_tensorrt_version(version)
    has_weak = trt is not None and hasattr(trt.BuilderFlag, "FP16")
    result = BuildResult(str(bundle_path), "onnx-only" if opts.onnx_only else "tensorrt", opts.precision, None, version)
    prepared = _prepare_graphs(bundle, graphs, opts, version, has_weak, result)
    if opts.onnx_only:
        be: Backend = PreparedOrtBackend({g: p.path for g, p in prepared.items()})
        entries: dict[str, dict[str, Any]] = {}
    else:
        from splitbits.runtime.backends.tensorrt import TrtBackend

        cuda = cuda or load_cuda()
        result.device = device_name(cuda)
        assert version is not None
        entries = _build_all(trt, bundle_path, prepared, opts, result.device, version, result)
        register_engines(bundle_path, entries)
        be = EnginesUnderTest(TrtBackend(precision=opts.precision, trt=trt, cuda=cuda, device=result.device), graphs)
    rep = _verify(bundle_path, be, opts.precision, opts.tol)
    result.verification = rep.to_dict()
    result.ok = rep.ok
    if entries:
        for e in entries.values():
            e["verification"] = {"ok": rep.ok, "problems": rep.problems, "max_abs_err": rep.max_abs_err,
                                 "symbol_mismatches": rep.symbol_mismatches, "tolerance": rep.tolerance}
        register_engines(bundle_path, entries)
    result.seconds = time.perf_counter() - t0
    return result
