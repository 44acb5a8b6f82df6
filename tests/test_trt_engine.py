"""Real TensorRT engines for the tiny bundles: build, verify against golden/, run, CUDA graphs.

Skipped (with the reason) where TensorRT, cuda-python or a CUDA device is missing — i.e. in CI;
run it on a Jetson (JetPack 6.1/6.2) or a desktop GPU: ``pytest tests/test_trt_engine.py -v``.
"""

from __future__ import annotations

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (JetPack's python3-libnvinfer or "
                                              "pip install 'splitbits[trt]'); engine tests skipped")


def _cuda_or_skip():
    from splitbits.runtime.backends.tensorrt import load_cuda
    from splitbits.runtime.errors import BackendError

    try:
        cuda = load_cuda()
        name = cuda.device_name()
    except BackendError as exc:
        pytest.skip(f"no CUDA device usable from Python here: {exc}")
    return cuda, name


pytestmark = pytest.mark.trt


@pytest.fixture(scope="module")
def cuda():
    return _cuda_or_skip()[0]


@pytest.mark.parametrize("family", ["fp", "mshp"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_build_verify_and_run(bundle_copy, cuda, family, precision, images):
    from splitbits.export.tensorrt import TrtBuildOptions, build_engines
    from splitbits.runtime.backends.tensorrt import TrtBackend
    from splitbits.runtime.bundle import load_bundle
    from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder

    b = bundle_copy(family)
    res = build_engines(b, TrtBuildOptions(precision=precision, max_batch=4, calib_count=16, progress=False),
                        cuda=cuda)
    assert res.ok, res.verification["problems"]
    engines = load_bundle(b).engines()
    assert all((b / e["file"]).is_file() for e in engines.values())
    be = TrtBackend(precision=precision, cuda=cuda)
    enc, dec = EdgeEncoder(b, be), ServerDecoder(b, "onnxruntime")
    logits = [dec.decode(enc.encode(im)) for im in images]  # TensorRT edge → ONNX Runtime server
    assert np.isfinite(np.stack(logits)).all()


def test_cuda_graph_replay_matches(bundle_copy, cuda, images):
    from splitbits.export.tensorrt import TrtBuildOptions, build_engines
    from splitbits.runtime.backends.tensorrt import TrtBackend
    from splitbits.runtime.pipeline import EdgeEncoder

    b = bundle_copy("fp")
    assert build_engines(b, TrtBuildOptions(precision="fp32", progress=False), cuda=cuda).ok
    plain = EdgeEncoder(b, TrtBackend(precision="fp32", cuda=cuda))
    backend = TrtBackend(precision="fp32", cuda_graph=True, cuda=cuda)
    graph = EdgeEncoder(b, backend)
    for im in list(images) * 2:
        assert plain.encode(im) == graph.encode(im)
    assert "cuda_graph_fallback" not in backend.describe()  # captured, not fallen back


def test_cuda_graphs_per_batch_size_on_the_tail(bundle_copy, cuda, images):
    """Batches above the profile's max run in chunks (2, 2, 1): a graph per shape, each replayed
    after the others ran, gives the logits of plain execution."""
    from splitbits.export.tensorrt import TrtBuildOptions, build_engines
    from splitbits.runtime.backends.tensorrt import TrtBackend
    from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder

    b = bundle_copy("fp")
    assert build_engines(b, TrtBuildOptions(precision="fp32", max_batch=2, graphs=["tail"], progress=False),
                         cuda=cuda).ok
    packets = EdgeEncoder(b, "onnxruntime").encode_batch(images[:5])
    plain = ServerDecoder(b, TrtBackend(precision="fp32", cuda=cuda)).decode_batch(packets)
    graphs = ServerDecoder(b, TrtBackend(precision="fp32", cuda_graph=True, cuda=cuda))
    for _ in range(2):
        np.testing.assert_allclose(graphs.decode_batch(packets), plain, atol=1e-4)
        np.testing.assert_allclose(graphs.decode_batch(packets[:2]), plain[:2], atol=1e-4)


def test_sessions_run_on_worker_threads(bundle_copy, cuda, images):
    """``send`` encodes on a worker thread: the primary context is bound there too."""
    from concurrent.futures import ThreadPoolExecutor

    from splitbits.export.tensorrt import TrtBuildOptions, build_engines
    from splitbits.runtime.backends.tensorrt import TrtBackend
    from splitbits.runtime.pipeline import EdgeEncoder

    b = bundle_copy("fp")
    assert build_engines(b, TrtBuildOptions(precision="fp32", progress=False), cuda=cuda).ok
    enc = EdgeEncoder(b, TrtBackend(precision="fp32", cuda_graph=True, cuda=cuda))
    with ThreadPoolExecutor(2) as pool:
        threaded = list(pool.map(enc.encode, images))
    assert threaded == [enc.encode(im) for im in images]
