"""The TensorRT build and backend code paths, run against CPU stand-ins of ``tensorrt`` and
cuda-python (``tests/trt_fakes.py``). This checks splitbits' glue — flags per TensorRT version,
FP32 pins, profiles, timing cache, manifest entries, device buffers, CUDA graph replay, engine
selection and verification — not TensorRT itself (see test_trt_engine.py for that)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import trt_fakes
from trt_fakes import GLOBAL, SUCCESS, THREAD_LOCAL, FakeCudart, FakeTrt

from splitbits.export.precision import plan_fp32
from splitbits.export.tensorrt import TrtBuildOptions, build_engines, choose_typing
from splitbits.runtime.backends import get_backend
from splitbits.runtime.backends.tensorrt import CudaPython, TrtBackend, load_cuda
from splitbits.runtime.bundle import load_bundle
from splitbits.runtime.errors import BackendError
from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder

SLUG = "fake-gpu"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fakes():
    cudart = FakeCudart()
    return FakeTrt(cudart), CudaPython(cudart), cudart


def _build(bundle, trt, cuda, **kw):
    opts = TrtBuildOptions(progress=False, calib_count=8, **kw)
    return build_engines(bundle, opts, trt=trt, cuda=cuda)


def test_trt10_fp16_weak_typing_pins_gdn_and_entropy_feeders(bundle_copy, fakes, tiny_bundles):
    trt, cuda, _ = fakes
    b = bundle_copy("mshp")
    res = _build(b, trt, cuda, precision="fp16", max_batch=4, opt_batch=2)
    assert res.ok, res.verification["problems"]
    assert res.device == "Fake GPU" and res.tensorrt == "10.3.0.30"
    builds = {json.loads(json.dumps(x["meta"]))["onnx"].rsplit("/", 1)[-1]: x for x in trt.builds}
    head = builds["head.onnx"]
    assert {"FP16", "OBEY_PRECISION_CONSTRAINTS"} <= head["config"].flags and "TF32" in head["config"].cleared
    assert not head["meta"]["strong"]
    assert head["config"].pools["WORKSPACE"] == 1024 << 20
    (prof,) = head["config"].profiles
    assert prof.shapes["x"] == ((1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64))
    layers = {layer.name: layer for layer in head["network"].layers}
    plan = plan_fp32(onnx.load(str(b / "head.onnx")), "head")
    assert layers["/g_a/g_a.1/Conv"].precision == "float32" and layers["/g_a/g_a.1/Conv"].output_types == {0: "float32"}
    assert layers["/h_a/h_a.2/Conv"].precision == "float32"  # produces z
    assert layers["/g_a/g_a.0/Conv"].precision is None  # free for FP16
    assert layers["/g_a/g_a.1/Shape"].precision is None  # integer shape layer, never pinned
    pinned = {n for n, layer in layers.items() if layer.precision == "float32"}
    assert pinned <= plan.nodes and len(pinned) == next(g.pinned_layers for g in res.graphs if g.graph == "head")
    assert "FP16" not in builds["hyper.onnx"]["config"].flags  # hyper stays FP32
    # manifest: engines by device/version/precision with sha256, outside the fingerprint
    bundle = load_bundle(b)
    engines = bundle.engines()
    assert set(engines) == {f"head.{SLUG}.trt10.3.0.fp16", f"hyper.{SLUG}.trt10.3.0.fp32",
                            f"tail.{SLUG}.trt10.3.0.fp16"}
    for e in engines.values():
        assert (b / e["file"]).is_file() and len(e["sha256"]) == 64 and e["verification"]["ok"]
        assert e["max_batch"] == 4 and e["opt_batch"] == 2
    assert (b / "engines" / f"{SLUG}.trt10.3.0.timing.cache").read_bytes().endswith(b"+")
    assert bundle.fingerprint == load_bundle(tiny_bundles["mshp"]).fingerprint  # packets stay compatible


def test_trt11_has_no_weak_typing_so_fp16_comes_from_the_onnx(bundle_copy):
    cudart = FakeCudart()
    trt = FakeTrt(cudart, version="11.0.0")
    b = bundle_copy("fp")
    res = _build(b, trt, CudaPython(cudart), precision="fp16")
    assert res.ok, res.verification["problems"]
    head = next(x for x in trt.builds if "head" in x["meta"]["onnx"])
    assert head["meta"]["strong"] and head["meta"]["onnx"].endswith("engines/head.fp16-mixed.onnx")
    assert head["network"].flags == 0 and head["network"].strongly_typed  # 11: every network is strongly typed
    assert head["config"].flags == set() and trt.deprecated == []  # no precision flags exist any more
    assert all(g.typing == "strong" for g in res.graphs)


def test_int8_is_explicit_qdq_and_reports_symbol_differences(bundle_copy, fakes):
    trt, cuda, _ = fakes
    b = bundle_copy("mshp")
    res = _build(b, trt, cuda, precision="int8")
    assert res.ok, res.verification["problems"]
    head = next(x for x in trt.builds if "head" in x["meta"]["onnx"])
    assert head["meta"]["onnx"].endswith("head.int8-qdq.onnx") and head["meta"]["strong"]
    assert "INT8" not in head["config"].flags  # explicit quantisation: no calibrator, no flag
    assert res.verification["exact_symbols"] is False
    assert set(load_bundle(b).engines()) >= {f"head.{SLUG}.trt10.3.0.int8", f"hyper.{SLUG}.trt10.3.0.fp32"}


def test_partial_build_is_verified_with_onnxruntime_for_the_other_graphs(bundle_copy, fakes):
    trt, cuda, _ = fakes
    b = bundle_copy("fp")
    res = _build(b, trt, cuda, precision="fp16", max_batch=16, graphs=["tail"])
    assert res.ok and [g.graph for g in res.graphs] == ["tail"]
    assert set(load_bundle(b).engines()) == {f"tail.{SLUG}.trt10.3.0.fp16"}
    assert load_bundle(b).engines()[f"tail.{SLUG}.trt10.3.0.fp16"]["max_batch"] == 16


class _Shifted:
    """An ONNX Runtime session whose output ``name`` comes out ``delta`` larger: an engine that computes
    something ONNX Runtime alone does not, so only packets/logits made from the engine's outputs match."""

    def __init__(self, sess, name: str, delta: float) -> None:
        self.sess, self.name, self.delta = sess, name, np.float32(delta)

    def run(self, names, feeds):
        return [o + self.delta if n == self.name else o for n, o in zip(names, self.sess.run(names, feeds))]


def test_tensorrt_backend_codes_the_engines_outputs(bundle_copy, fakes, images):
    """Packets and logits come from the engines' device buffers (the fake engines shift y and the
    logits, which ONNX Runtime does not), batches above the profile's max run in chunks."""
    trt, cuda, _ = fakes
    b = bundle_copy("mshp")
    _build(b, trt, cuda, precision="fp32", max_batch=2)
    be = TrtBackend(precision="fp32", trt=trt, cuda=cuda)
    assert be.has_engines(load_bundle(b))
    enc, dec = EdgeEncoder(b, be), ServerDecoder(b, be)
    ort_enc, ort_dec = EdgeEncoder(b, "onnxruntime"), ServerDecoder(b, "onnxruntime")
    shifted_ort = EdgeEncoder(b, "onnxruntime")
    enc.head.engine.session = _Shifted(enc.head.engine.session, "y", 1.0)
    shifted_ort.head._sess = _Shifted(shifted_ort.head._sess, "y", 1.0)
    for im in images[:3]:
        packet = enc.encode(im)
        assert packet == shifted_ort.encode(im) and packet != ort_enc.encode(im)
    assert enc.head.context.runs == 3
    dec.tail.engine.session = _Shifted(dec.tail.engine.session, "logits", 1.0)
    packets = [ort_enc.encode(im) for im in images[:5]]
    batched = dec.decode_batch(packets)  # 5 > max batch 2: run in chunks
    np.testing.assert_allclose(batched, ort_dec.decode_batch(packets) + 1.0, atol=1e-5)
    assert dec.tail.context.runs == 3
    desc = be.describe()  # (MSHP bundles with hyper_int.npz run hyper on the integer path, not an engine)
    assert {"head=fp32", "tail=fp32"} <= set(desc["precision"].split(",")) and desc["cuda"] == "cuda-python"
    with pytest.raises(BackendError, match=r"outside the engine's profile|engine expects"):
        dec.tail.run({"y_hat": np.zeros((1, 3, 2, 2), np.float32)})


def test_cuda_graph_is_captured_once_per_shape_then_replayed(bundle_copy, fakes, images):
    trt, cuda, cudart = fakes
    b = bundle_copy("fp")
    _build(b, trt, cuda, precision="fp32")
    be = TrtBackend(precision="fp32", cuda_graph=True, trt=trt, cuda=cuda)
    enc = EdgeEncoder(b, be)
    ref = EdgeEncoder(b, "onnxruntime")
    outs = [enc.encode(images[i % 2]) for i in range(4)]
    assert outs == [ref.encode(images[i % 2]) for i in range(4)]
    assert cudart.launches == 3  # first run normal (+capture), then replays
    enc.head.close()


def test_engines_for_another_precision_or_a_tampered_engine_are_refused(bundle_copy, fakes):
    trt, cuda, _ = fakes
    b = bundle_copy("fp")
    _build(b, trt, cuda, precision="fp16")
    bundle = load_bundle(b)
    with pytest.raises(BackendError, match=r"no int8 TensorRT engine.*splitbits export .* --trt --precision int8"):
        TrtBackend(precision="int8", trt=trt, cuda=cuda).load(bundle, "head")
    other = TrtBackend(precision="fp16", trt=trt, cuda=cuda, device="Jetson Orin Nano")
    assert not other.has_engines(bundle)
    engine = b / bundle.engines()[f"tail.{SLUG}.trt10.3.0.fp16"]["file"]
    engine.write_bytes(engine.read_bytes() + b"x")
    with pytest.raises(BackendError, match="sha256"):
        TrtBackend(precision="fp16", trt=trt, cuda=cuda).load(bundle, "tail")


@pytest.fixture
def installed_fakes(monkeypatch, fakes):
    """Make ``import tensorrt`` and ``from cuda.bindings import runtime`` find the fakes."""
    trt, _, cudart = fakes
    cuda_pkg = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda_pkg.bindings = bindings
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", cuda_pkg)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return fakes


def test_auto_picks_tensorrt_only_where_engines_exist(bundle_copy, installed_fakes):
    trt, cuda, _ = installed_fakes
    with_engines, without = bundle_copy("fp"), bundle_copy("mshp")
    _build(with_engines, trt, cuda, precision="fp16")
    assert get_backend("auto", bundle=load_bundle(with_engines)).name == "tensorrt"
    assert get_backend("auto", bundle=load_bundle(without)).name == "onnxruntime"
    assert get_backend("auto").name == "onnxruntime"  # no bundle, no engines to check
    assert EdgeEncoder(with_engines, "auto").backend.name == "tensorrt"


def test_bench_on_the_tensorrt_backend(bundle_copy, installed_fakes, tmp_path):
    from support import textured_images as _images

    from splitbits.runtime.cli import main as cli_main

    trt, cuda, _ = installed_fakes
    b = bundle_copy("mshp")
    _build(b, trt, cuda, precision="fp16")
    np.savez(tmp_path / "in.npz", images=_images(4, seed=2), labels=np.arange(4))
    out = tmp_path / "bench.json"
    status = cli_main(["bench", str(b), "--backend", "tensorrt", "--precision", "fp16", "--cuda-graph",
                       "--inputs", str(tmp_path / "in.npz"), "--warmup", "1", "--no-progress", "--json", str(out)])
    result = json.loads(out.read_text())
    assert status == 0 and result["status"] == "ok"
    assert result["backend"]["backend"] == "tensorrt" and result["backend"]["cuda_graph"] == "true"
    assert result["verification"]["tolerance"] == {"atol": 5e-2, "rtol": 5e-2}


# --------------------------------------------------------------------------------------------
# the fakes' rules: each can fail, so the tests above and below can
# --------------------------------------------------------------------------------------------

GDN_NODES = ("/encoder/encoder.1/", "/encoder/encoder.3/")  # the fp bundle's head GDNs


def _fake_build(trt, onnx_path, *, flags: int = 0, builder_flags=(), pins=(), max_batch: int = 2):
    """Drive the fake builder directly (not through splitbits): serialised engine or None."""
    builder = trt.Builder(trt.Logger())
    network = builder.create_network(flags)
    assert trt.OnnxParser(network, None).parse_from_file(str(onnx_path))
    config = builder.create_builder_config()
    for f in builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name.startswith(tuple(pins)):
            layer.precision = trt.float32
    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    dims = inp.shape[1:]
    profile.set_shape(inp.name, (1, *dims), (max_batch, *dims), (max_batch, *dims))
    config.add_optimization_profile(profile)
    return builder.build_serialized_network(network, config)


class _Rig:
    """One fake engine, its device buffers (batch ``max_batch``) and a stream, driven by hand."""

    def __init__(self, trt, engine_bytes, max_batch: int = 2) -> None:
        self.cudart = trt.cudart
        self.engine = trt.Runtime(None).deserialize_cuda_engine(engine_bytes)
        self.stream = self.cudart.cudaStreamCreateWithFlags(1)[1]
        self.dims = {n: self.engine.get_tensor_shape(n)[1:] for n in self.engine.names}
        self.ptr = {n: self.cudart.cudaMalloc(max_batch * int(np.prod(d)) * 4)[1] for n, d in self.dims.items()}
        self.x = self.engine.input_names[0]

    def context(self, strategy: str = "STATIC"):
        ctx = self.engine.create_execution_context(strategy)
        assert all(ctx.set_tensor_address(n, p) for n, p in self.ptr.items())
        return ctx

    def enqueue(self, ctx, x: np.ndarray) -> bool:
        self.cudart.write(self.ptr[self.x], x.astype(np.float32))
        assert ctx.set_input_shape(self.x, x.shape)
        return ctx.execute_async_v3(int(self.stream))

    def output(self, name: str, batch: int) -> np.ndarray:
        n = batch * int(np.prod(self.dims[name]))
        return self.cudart.read(self.ptr[name], 4 * n).view(np.float32).reshape(batch, *self.dims[name])


def _ort(onnx_path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _golden_x(bundle) -> np.ndarray:
    return np.load(bundle / "golden" / "golden.npz")["x"].astype(np.float32)


def test_fake_strongly_typed_networks_reject_precision_settings(tiny_bundles):
    head = tiny_bundles["fp"] / "head.onnx"
    trt10 = FakeTrt(FakeCudart(), "10.3.0.30")
    strong = 1 << trt10.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert _fake_build(trt10, head, flags=strong) is not None
    assert _fake_build(trt10, head, flags=strong, pins=GDN_NODES) is None
    assert _fake_build(trt10, head, flags=strong, builder_flags=["FP16"]) is None
    assert any("strongly typed" in e for e in trt10.errors)
    trt11 = FakeTrt(FakeCudart(), "11.1.0")
    assert not hasattr(trt11.BuilderFlag, "FP16") and not hasattr(trt11.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS")
    with pytest.raises(AttributeError, match="removed in TensorRT 11"):
        _fake_build(trt11, head, pins=GDN_NODES)


def test_fake_fp16_engines_compute_in_fp16(tiny_bundles):
    b = tiny_bundles["fp"]
    x = _golden_x(b)
    trt = FakeTrt(FakeCudart())
    fp32 = trt.Runtime(None).deserialize_cuda_engine(_fake_build(trt, b / "head.onnx", max_batch=4))
    fp16 = trt.Runtime(None).deserialize_cuda_engine(_fake_build(
        trt, b / "head.onnx", builder_flags=["FP16", "OBEY_PRECISION_CONSTRAINTS"], pins=GDN_NODES, max_batch=4))
    (ref,) = _ort(b / "head.onnx", x)
    (y32,) = fp32.session.run(None, {"x": x})
    (y16,) = fp16.session.run(None, {"x": x})
    assert np.abs(y32 - ref).max() < 1e-5  # FP32 engines compute what ONNX Runtime computes
    assert 1e-4 < np.abs(y16 - ref).max() < 5e-2  # FP16 engines do not, within the FP16 tolerance


def _square_onnx(path: Path) -> Path:
    """y = x·x, the first thing a GDN computes: above |x| ≈ 256 the square overflows FP16."""
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["y"], name="square")], "square", io[:1], io[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_fake_fp32_pins_hold_only_with_obey_and_fp16_overflows(tmp_path, tiny_bundles):
    trt = FakeTrt(FakeCudart())

    def run(onnx_path, x, *flags, pins=()):
        data = _fake_build(trt, onnx_path, builder_flags=["FP16", *flags], pins=pins)
        return trt.Runtime(None).deserialize_cuda_engine(data).session.run(None, {"x": x})[0]

    square, x = _square_onnx(tmp_path / "square.onnx"), np.full((1, 4), 300.0, np.float32)
    assert np.isinf(run(square, x)).all()  # 90000 > 65504: FP16 overflows
    assert np.isinf(run(square, x, pins=["square"])).all()  # a pin alone is a hint TensorRT may ignore
    assert (run(square, x, "OBEY_PRECISION_CONSTRAINTS", pins=["square"]) == 90000).all()
    head, golden = tiny_bundles["fp"] / "head.onnx", _golden_x(tiny_bundles["fp"])[:1]
    (ref,) = _ort(head, golden)
    assert np.abs(run(head, golden, "OBEY_PRECISION_CONSTRAINTS", pins=[""]) - ref).max() < 1e-6  # all FP32
    assert np.abs(run(head, golden, pins=[""]) - ref).max() > 1e-4


def test_fake_copies_and_kernels_wait_for_the_stream():
    cudart = FakeCudart()
    stream = cudart.cudaStreamCreateWithFlags(1)[1]
    dev, host = cudart.cudaMalloc(16)[1], cudart.cudaMallocHost(16)[1]
    cudart.write(host, np.arange(16, dtype=np.uint8))
    cudart.cudaMemcpyAsync(dev, host, 16, FakeCudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)
    assert not cudart.read(dev, 16).any()  # not copied yet
    cudart.cudaStreamSynchronize(stream)
    assert list(cudart.read(dev, 16)) == list(range(16))
    back = cudart.cudaMallocHost(16)[1]
    cudart.cudaMemcpyAsync(back, dev, 16, FakeCudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)
    assert not cudart.read(back, 16).any()  # a missing sync reads stale data
    cudart.cudaStreamSynchronize(stream)
    assert list(cudart.read(back, 16)) == list(range(16))
    pageable = np.zeros(16, np.uint8)  # copies to pageable memory are synchronous
    cudart.cudaMemcpyAsync(pageable.ctypes.data, dev, 16, FakeCudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)
    assert list(pageable) == list(range(16))


def test_fake_capture_can_fail(tiny_bundles):
    trt = FakeTrt(FakeCudart(capture_fails=True))
    rig = _Rig(trt, _fake_build(trt, tiny_bundles["fp"] / "head.onnx"))
    ctx = rig.context()
    x = _golden_x(tiny_bundles["fp"])[:1]
    assert rig.enqueue(ctx, x)  # outside capture the engine runs
    cudart = trt.cudart
    assert cudart.cudaStreamBeginCapture(rig.stream, THREAD_LOCAL) == (SUCCESS,)
    assert not rig.enqueue(ctx, x)
    err, graph = cudart.cudaStreamEndCapture(rig.stream)
    assert err == FakeCudart.cudaError_t.cudaErrorStreamCaptureInvalidated and graph is None


def test_fake_global_capture_forbids_other_threads_unsafe_calls_thread_local_does_not():
    cudart = FakeCudart()
    stream = cudart.cudaStreamCreateWithFlags(1)[1]

    def malloc_elsewhere():
        out = []
        t = threading.Thread(target=lambda: out.append(cudart.cudaMalloc(64)[0]))
        t.start()
        t.join()
        return out[0]

    for mode, other, end in [(GLOBAL, "cudaErrorStreamCaptureUnsupported", "cudaErrorStreamCaptureInvalidated"),
                             (THREAD_LOCAL, "cudaSuccess", "cudaSuccess")]:
        assert cudart.cudaStreamBeginCapture(stream, mode) == (SUCCESS,)
        assert malloc_elsewhere().name == other
        assert cudart.cudaStreamEndCapture(stream)[0].name == end
    cudart.cudaStreamBeginCapture(stream, THREAD_LOCAL)
    assert cudart.cudaMalloc(64)[0].name == "cudaErrorStreamCaptureUnsupported"  # the capturing thread may not
    assert cudart.cudaStreamEndCapture(stream)[0].name == "cudaErrorStreamCaptureInvalidated"


def test_fake_first_enqueue_of_a_shape_cannot_be_captured(tiny_bundles):
    trt = FakeTrt(FakeCudart())
    rig = _Rig(trt, _fake_build(trt, tiny_bundles["fp"] / "head.onnx"))
    x = _golden_x(tiny_bundles["fp"])
    for warm_up, ok in [(False, False), (True, True)]:
        ctx = rig.context()
        if warm_up:
            assert rig.enqueue(ctx, x[:1])
            trt.cudart.cudaStreamSynchronize(rig.stream)
        trt.cudart.cudaStreamBeginCapture(rig.stream, THREAD_LOCAL)
        assert rig.enqueue(ctx, x[:1]) is ok
        assert (trt.cudart.cudaStreamEndCapture(rig.stream)[0] == SUCCESS) is ok


def test_fake_graph_replays_what_it_captured(tiny_bundles):
    """Kernels keep their captured shapes and addresses; the context's host state is read at
    replay, so the graph is wrong once its context ran other shapes."""
    b = tiny_bundles["fp"]
    trt = FakeTrt(FakeCudart())
    cudart = trt.cudart
    rig = _Rig(trt, _fake_build(trt, b / "head.onnx"))
    x = _golden_x(b)
    (ref,) = _ort(b / "head.onnx", x[:2])
    ctx = rig.context()
    rig.enqueue(ctx, x[:2])
    cudart.cudaStreamSynchronize(rig.stream)
    cudart.cudaStreamBeginCapture(rig.stream, THREAD_LOCAL)
    rig.enqueue(ctx, x[:2])
    graph = cudart.cudaGraphInstantiate(cudart.cudaStreamEndCapture(rig.stream)[1], 0)[1]

    def replay() -> np.ndarray:
        cudart.write(rig.ptr["y"], np.zeros(ref.size, np.float32))
        cudart.cudaGraphLaunch(graph, rig.stream)
        cudart.cudaStreamSynchronize(rig.stream)
        return rig.output("y", 2)

    np.testing.assert_allclose(replay(), ref, atol=1e-5)
    assert ctx.set_input_shape("x", (1, *x.shape[1:]))  # a shape change alone: the kernels keep theirs
    np.testing.assert_allclose(replay(), ref, atol=1e-5)
    rig.enqueue(ctx, x[:1])  # the context ran batch 1: its staged state no longer fits the graph
    cudart.cudaStreamSynchronize(rig.stream)
    assert np.abs(replay() - ref).max() > 1e-3
    moved = cudart.cudaMalloc(4 * ref.size)[1]
    ctx.set_tensor_address("y", moved)  # new addresses: the graph still writes the captured ones
    cudart.cudaGraphLaunch(graph, rig.stream)
    cudart.cudaStreamSynchronize(rig.stream)
    assert not cudart.read(moved, 4 * ref.size).any()


def test_fake_cuda_context_belongs_to_a_thread(tiny_bundles):
    trt = FakeTrt(FakeCudart())
    cudart = trt.cudart
    rig = _Rig(trt, _fake_build(trt, tiny_bundles["fp"] / "head.onnx"))
    ctx = rig.context()
    x = _golden_x(tiny_bundles["fp"])[:1]
    results = {}

    def fresh():  # no context current: the runtime binds the primary context
        results["fresh"] = (cudart.cudaStreamSynchronize(rig.stream)[0], rig.enqueue(ctx, x))

    def foreign():  # another context current: the stream and the engine are not usable here
        cudart.push_foreign_context()
        results["foreign"] = (cudart.cudaStreamSynchronize(rig.stream)[0], rig.enqueue(ctx, x))
        cudart.cudaSetDevice(0)
        results["bound"] = (cudart.cudaStreamSynchronize(rig.stream)[0], rig.enqueue(ctx, x))

    for fn in (fresh, foreign):
        t = threading.Thread(target=fn)
        t.start()
        t.join()
    assert results["fresh"] == (SUCCESS, True) and results["bound"] == (SUCCESS, True)
    assert results["foreign"] == (FakeCudart.cudaError_t.cudaErrorInvalidResourceHandle, False)


@pytest.mark.parametrize("version,strong_flag,weak_flags,deprecated", [
    ("8.6.2", None, True, False), ("10.3.0.30", 1, True, False), ("10.12.0", 1, True, True),
    ("11.1.0", 0, False, None)])
def test_fake_tensorrt_versions(tiny_bundles, version, strong_flag, weak_flags, deprecated):
    trt = FakeTrt(FakeCudart(), version)
    head = tiny_bundles["fp"] / "head.onnx"
    assert getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None) == strong_flag
    assert hasattr(trt.BuilderFlag, "FP16") == weak_flags
    network = trt.Builder(None).create_network(0)
    if version.startswith("8."):  # implicit batch unless asked: the ONNX parser refuses it
        assert not trt.OnnxParser(network, None).parse_from_file(str(head))
        explicit = trt.Builder(None).create_network(1 << trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        assert trt.OnnxParser(explicit, None).parse_from_file(str(head))
        return
    assert network.strongly_typed == version.startswith("11.")
    if weak_flags:
        assert _fake_build(trt, head, builder_flags=["FP16", "OBEY_PRECISION_CONSTRAINTS"], pins=GDN_NODES)
        assert bool(trt.deprecated) == deprecated


def test_fake_refuses_unaligned_addresses_and_another_devices_timing_cache(tiny_bundles):
    trt = FakeTrt(FakeCudart())
    rig = _Rig(trt, _fake_build(trt, tiny_bundles["fp"] / "head.onnx"))
    ctx = rig.context()
    assert not ctx.set_tensor_address("x", rig.ptr["x"] + 64)
    assert not ctx.set_tensor_address("nope", rig.ptr["x"])
    config = trt.Builder(None).create_builder_config()
    assert config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    assert not config.set_timing_cache(config.create_timing_cache(b"FAKECACHE|Other GPU|++"), ignore_mismatch=False)


def test_fake_driver_older_than_the_runtime_fails_every_call():
    assert FakeCudart(driver_version=12060, runtime_version=12060).cudaMalloc(8)[0] == SUCCESS
    old = FakeCudart(driver_version=12060, runtime_version=12090)  # Jetson: no minor-version compatibility
    assert old.cudaMalloc(8)[0].name == "cudaErrorInsufficientDriver"
    assert old.cudaSetDevice(0)[0].name == "cudaErrorInsufficientDriver"
    desktop = FakeCudart(driver_version=12040, runtime_version=12090, minor_version_compat=True)
    assert desktop.cudaMalloc(8)[0] == SUCCESS
    next_major = FakeCudart(driver_version=12080, runtime_version=13000, minor_version_compat=True)
    assert next_major.cudaMalloc(8)[0] != SUCCESS


def test_fake_user_managed_context_needs_device_memory(tiny_bundles):
    trt = FakeTrt(FakeCudart())
    rig = _Rig(trt, _fake_build(trt, tiny_bundles["fp"] / "head.onnx"))
    x = _golden_x(tiny_bundles["fp"])[:1]
    ctx = rig.context("USER_MANAGED")
    assert not rig.enqueue(ctx, x)
    ctx.set_device_memory(trt.cudart.cudaMalloc(rig.engine.device_memory_size_v2)[1], rig.engine.device_memory_size_v2)
    assert rig.enqueue(ctx, x)


# --------------------------------------------------------------------------------------------
# the review's defects (issue 14), each with the test that failed before its fix
# --------------------------------------------------------------------------------------------


def test_1_tensorrt_8_6_is_refused_naming_jetpack_6_1_and_6_2(bundle_copy):
    cudart = FakeCudart()
    trt = FakeTrt(cudart, version="8.6.2")
    with pytest.raises(BackendError, match=r"TensorRT 8\.6\.2 .*JetPack 6\.1 or 6\.2"):
        TrtBackend(trt=trt, cuda=CudaPython(cudart))
    with pytest.raises(BackendError, match=r"JetPack 6\.1 or 6\.2"):
        _build(bundle_copy("fp"), trt, CudaPython(cudart), precision="fp16")
    with pytest.raises(BackendError, match=r"JetPack 6\.1 or 6\.2"):
        choose_typing("8.6.2", True, "fp16", None)


@pytest.mark.parametrize("release,ok", [
    ("# R36 (release), REVISION: 3.0, GCID: 36106755, BOARD: generic, EABI: aarch64", False),  # JetPack 6.0
    ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64", True),  # 6.1
    ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64", True),  # 6.2
    ("# R35 (release), REVISION: 5.0, GCID: 35550185, BOARD: t186ref, EABI: aarch64", False)])  # JetPack 5
def test_1_setup_sh_accepts_jetpack_6_1_and_6_2_only(tmp_path, release, ok):
    setup = ROOT / "jetson" / "setup.sh"
    assert "--check-release" in setup.read_text()  # (the old script had no check: never run it here)
    (tmp_path / "nv_tegra_release").write_text(release + "\n")
    res = subprocess.run(["bash", str(setup), "--check-release", str(tmp_path / "nv_tegra_release")],
                         capture_output=True, text=True, timeout=30)
    assert (res.returncode == 0) == ok, res.stderr
    if not ok:
        assert "JetPack 6.1 or 6.2" in res.stderr


def test_2_pycuda_is_not_a_fallback(monkeypatch):
    """pycuda.autoinit's context is current on the importing thread only, and ``send`` runs the
    encoder on a worker thread: without cuda-python the backend says so instead."""
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    pycuda = types.ModuleType("pycuda")
    pycuda.autoinit = types.ModuleType("pycuda.autoinit")
    pycuda.driver = types.ModuleType("pycuda.driver")
    for name, mod in (("pycuda", pycuda), ("pycuda.autoinit", pycuda.autoinit), ("pycuda.driver", pycuda.driver)):
        monkeypatch.setitem(sys.modules, name, mod)
    with pytest.raises(BackendError, match=r"cuda-python is not installed"):
        load_cuda()


def test_2_sessions_run_on_any_thread_in_the_primary_context(bundle_copy, fakes, images):
    trt, cuda, cudart = fakes
    b = bundle_copy("fp")
    _build(b, trt, cuda, precision="fp32")
    enc = EdgeEncoder(b, TrtBackend(precision="fp32", trt=trt, cuda=cuda))
    ref = EdgeEncoder(b, "onnxruntime")

    def worker(image):  # like send's thread pool, where another library left its context current
        cudart.push_foreign_context()
        return enc.encode(image)

    with ThreadPoolExecutor(2) as pool:
        packets = list(pool.map(worker, images[:4]))
    assert packets == [ref.encode(im) for im in images[:4]]


def test_3_capture_failure_falls_back_to_plain_execution_with_the_real_error(bundle_copy, images, caplog):
    cudart = FakeCudart(capture_fails=True)
    trt, cuda = FakeTrt(cudart), CudaPython(cudart)
    b = bundle_copy("fp")
    _build(b, trt, cuda, precision="fp32")
    be = TrtBackend(precision="fp32", cuda_graph=True, trt=trt, cuda=cuda)
    enc, ref = EdgeEncoder(b, be), EdgeEncoder(b, "onnxruntime")
    with caplog.at_level(logging.WARNING):
        assert [enc.encode(images[i % 2]) for i in range(3)] == [ref.encode(images[i % 2]) for i in range(3)]
    assert cudart.launches == 0 and not cudart.captures  # no graph; the failed capture was ended
    fallback = be.describe()["cuda_graph_fallback"]
    assert "execute_async_v3 failed" in fallback and "Invalidated" not in fallback
    assert "CUDA graph capture failed" in caplog.text and "plain execution" in caplog.text


def test_3_capture_is_thread_local_so_other_threads_may_allocate(bundle_copy, fakes, images):
    trt, cuda, cudart = fakes
    b = bundle_copy("fp")
    _build(b, trt, cuda, precision="fp32")
    enc = EdgeEncoder(b, TrtBackend(precision="fp32", cuda_graph=True, trt=trt, cuda=cuda))
    other = []

    def another_thread_allocates():  # e.g. the server's decode thread setting up while the edge captures
        t = threading.Thread(target=lambda: other.append(cudart.cudaMalloc(64)[0]))
        t.start()
        t.join()

    cudart.during_capture = another_thread_allocates
    assert enc.encode(images[0]) == enc.encode(images[0]) == EdgeEncoder(b, "onnxruntime").encode(images[0])
    assert other == [SUCCESS] and cudart.capture_modes == [THREAD_LOCAL] and cudart.launches == 1


def test_4_cuda_graphs_replay_the_right_batch_when_batches_split_2_2_1(bundle_copy, fakes, images):
    trt, cuda, cudart = fakes
    b = bundle_copy("fp")
    _build(b, trt, cuda, precision="fp32", max_batch=2)
    graphs = ServerDecoder(b, TrtBackend(precision="fp32", cuda_graph=True, trt=trt, cuda=cuda))
    packets = [EdgeEncoder(b, "onnxruntime").encode(im) for im in images[:5]]
    want = ServerDecoder(b, "onnxruntime").decode_batch(packets)
    for _ in range(2):  # 2, 2, 1, then 2 again: the batch-2 graph replays after a batch-1 run
        np.testing.assert_allclose(graphs.decode_batch(packets), want, atol=1e-4)
        np.testing.assert_allclose(graphs.decode_batch(packets[:2]), want[:2], atol=1e-4)
    assert cudart.launches == 6  # 8 runs, of which the first of each shape (2 and 1) captured


def test_5_tensorrt_10_12_builds_strongly_typed_without_the_deprecated_weak_typing_apis(bundle_copy):
    cudart = FakeCudart()
    trt = FakeTrt(cudart, version="10.12.0")
    res = _build(bundle_copy("mshp"), trt, CudaPython(cudart), precision="fp16")
    assert res.ok, res.verification["problems"]
    assert trt.deprecated == []  # no BuilderFlag.FP16 / OBEY_PRECISION_CONSTRAINTS / layer.precision
    head = next(x for x in trt.builds if "head" in x["meta"]["onnx"])
    assert head["network"].strongly_typed and head["meta"]["onnx"].endswith("engines/head.fp16-mixed.onnx")
    assert all(g.typing == "strong" for g in res.graphs)


def test_6_a_driver_older_than_cuda_pythons_runtime_is_a_clear_error():
    cudart = FakeCudart(driver_version=12060, runtime_version=12090)  # JetPack 6.1/6.2 with cuda-python 12.9
    want = r"driver supports CUDA 12\.6 .*CUDA runtime 12\.9.*cuda-python>=12\.6,<12\.7"
    with pytest.raises(BackendError, match=want):
        TrtBackend(trt=FakeTrt(cudart), cuda=CudaPython(cudart))


def test_6_jetson_installs_pin_cuda_python_to_the_cuda_12_6_of_jetpack_6():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "cuda-python>=12.6,<12.7" in extras["jetson"]
    setup = (ROOT / "jetson" / "setup.sh").read_text()
    assert "cuda-python>=12.6,<12.7" in setup and "cuda-python>=12,<13" not in setup


def test_7_a_refused_tensor_address_is_a_clear_error(bundle_copy, fakes, monkeypatch):
    trt, cuda, _ = fakes
    b = bundle_copy("fp")
    _build(b, trt, cuda, precision="fp32")
    monkeypatch.setattr(trt_fakes._Context, "set_tensor_address", lambda self, name, ptr: False)
    with pytest.raises(BackendError, match=r"TensorRT refused the device address of x"):
        TrtBackend(precision="fp32", trt=trt, cuda=cuda).load(load_bundle(b), "head")


def test_7_a_refused_timing_cache_is_a_clear_error(bundle_copy, fakes):
    trt, cuda, _ = fakes
    b = bundle_copy("fp")
    cache = b / "engines" / f"{SLUG}.trt10.3.0.timing.cache"
    cache.parent.mkdir()
    cache.write_bytes(b"FAKECACHE|Other GPU|+++")  # copied from another machine with the same board name
    with pytest.raises(BackendError, match=r"TensorRT refused the timing cache .*delete it"):
        _build(b, trt, cuda, precision="fp32")


ORIN_AGX_JP5 = (  # an AGX Orin 64GB dev kit (github.com/catid, "sudo tegrastats")
    "04-24-2023 00:01:24 RAM 1282/62795MB (lfb 15152x4MB) SWAP 0/31398MB (cached 0MB) CPU [0%@729,0%@729,"
    "0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@2133 GR3D_FREQ 0%@0 "
    "GR3D2_FREQ 0%@0 VIC_FREQ 729 APE 174 CV0@-256C CPU@42.593C Tboard@32C SOC2@39.343C Tdiode@33.25C "
    "SOC0@39.375C CV1@-256C GPU@-256C tj@42.593C SOC1@40.468C CV2@-256C VDD_GPU_SOC 2399mW/2399mW "
    "VDD_CPU_CV 400mW/400mW VIN_SYS_5V0 4032mW/4032mW NC 0mW/0mW VDDQ_VDD2_1V8AO 301mW/301mW NC 0mW/0mW")
ORIN_AGX_JP6 = (  # a later AGX Orin line (a Go tegrastats parser's test data)
    "04-11-2025 10:36:27 RAM 4321/62801MB (lfb 1759x4MB) SWAP 19/31400MB (cached 0MB) CPU [0%@729,0%@729,"
    "0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[0,0] "
    "VIC_FREQ 729 APE 174 CV0@-256C CPU@44.562C Tboard@32C SOC2@40.093C Tdiode@33C SOC0@41.093C CV1@-256C "
    "GPU@-256C tj@44.343C SOC1@41.25C CV2@-256C VDD_GPU_SOC 2340mW/2340mW VDD_CPU_CV 390mW/390mW "
    "VIN_SYS_5V0 4025mW/4025mW NC 0mW/0mW VDDQ_VDD2_1V8AO 301mW/301mW NC 0mW/0mW")


@pytest.mark.parametrize("line,total", [(ORIN_AGX_JP5, 2399 + 400 + 4032 + 301),
                                        (ORIN_AGX_JP6, 2340 + 390 + 4025 + 301)])
def test_7_tegrastats_agx_orin_no_connect_rails_are_not_power_rails(line, total):
    from splitbits.jetson.tegrastats import parse_line

    s = parse_line(line)
    assert set(s.rails_mw) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"}
    assert s.power_mw() == (float(total), "sum of VDDQ_VDD2_1V8AO+VDD_CPU_CV+VDD_GPU_SOC+VIN_SYS_5V0")
    assert len(s.cpu) == 12 and s.temps_c["tj"] > 40
