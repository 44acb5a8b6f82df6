"""The TensorRT build and backend code paths, run against CPU stand-ins of ``tensorrt`` and
cuda-python (``tests/trt_fakes.py``). This checks splitbits' glue — flags per TensorRT version,
FP32 pins, profiles, timing cache, manifest entries, device buffers, CUDA graph replay, engine
selection and verification — not TensorRT itself (see test_trt_engine.py for that)."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import onnx
import pytest
from trt_fakes import FakeCudart, FakeTrt

from splitbits.export.precision import plan_fp32
from splitbits.export.tensorrt import TrtBuildOptions, build_engines
from splitbits.runtime.backends import get_backend
from splitbits.runtime.backends.tensorrt import CudaPython, TrtBackend
from splitbits.runtime.bundle import load_bundle
from splitbits.runtime.errors import BackendError
from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder

SLUG = "fake-gpu"


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
    assert head["network"].flags == 1 << FakeTrt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert head["config"].flags == set()  # no precision flags exist any more
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
