"""No silent corruption across devices (MSHP): encode with one backend, decode with another.

The integer hyper path (``splitbits.runtime.hyper_int``: an exact integer graph on ONNX Runtime's CPU
provider, whatever the backend) computes the scale indexes and means from the ẑ symbols, so an FP16
edge engine and an FP32 server agree bit for bit; the float path can disagree, and then decoding is
an explicit ``IndexMismatchError``. Tiny model and an sc2bench-architecture ResNet-50 at 224.

The tiny model is untrained, so its z is almost all zeros; the fixture scales h_a and h_s up so that
z, the scales and the indexes spread over the tables like a trained model's (otherwise the test
would prove nothing).
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from support import textured_images as _images

from splitbits.runtime import packet as pkt
from splitbits.runtime.bundle import MANIFEST, fingerprint_of, load_bundle
from splitbits.runtime.errors import BundleError, IndexMismatchError
from splitbits.runtime.hyper_int import IntHyperParams
from splitbits.runtime.pipeline import EdgeEncoder, IntHyper, ServerDecoder, make_hyper

pytestmark = pytest.mark.slow  # every test here uses the module's own export (stressed_bundle)


@pytest.fixture(scope="module")
def stressed_model():
    return _stressed("tiny", 64, 10)


def _stressed(arch: str, size: int, classes: int):
    """An untrained MSHP student with h_a's last convolution ×30 and h_s ×3: ẑ fills the z tables'
    support and the scale indexes spread like a trained model's."""
    from splitbits.trainer.models import ModelSpec, build_model

    torch.manual_seed(0)
    m = build_model(ModelSpec(arch=arch, family="mshp", num_classes=classes, input_size=size)).eval()
    bl = m.bottleneck_layer
    with torch.no_grad():
        bl.h_a[2].weight.mul_(30.0)
        for i in (0, 2, 4):
            bl.h_s[i].weight.mul_(3.0)
    m.update_entropy_tables(force=True)
    return m


@pytest.fixture(scope="module")
def stressed_bundle(stressed_model, tmp_path_factory):
    from splitbits.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("stressed") / "mshp"
    return export_bundle(stressed_model, out, images=_images(4, seed=11)).path


@pytest.fixture(scope="module")
def backends(stressed_model):
    from splitbits.export.torch_backend import TorchBackend
    from splitbits.runtime.backends import get_backend

    return {
        "torch-fp32": TorchBackend(copy.deepcopy(stressed_model)),
        "torch-fp16": TorchBackend(copy.deepcopy(stressed_model), dtype=torch.float16),
        "onnxruntime": get_backend("onnxruntime"),
        "onnxruntime-4-threads": get_backend("onnxruntime", threads=4),
    }


CROSS_IMAGES = _images(40, seed=5)


def test_fixture_spreads_the_indexes(stressed_bundle):
    enc = EdgeEncoder(stressed_bundle, "onnxruntime")
    res = enc.analyze_batch(CROSS_IMAGES[:8])
    assert len(np.unique(np.concatenate([r.idx.ravel() for r in res]))) >= 10
    assert any(np.abs(r.symbols["z"]).max() > 0 for r in res)


def _cross(bundle, backends: dict, images: np.ndarray) -> tuple[int, int]:
    """Every (encoder backend, decoder backend) pair over ``images``: (mismatches, packets decoded);
    asserts identical symbols, indexes and ŷ (bit for bit) wherever a packet decodes."""
    encoders = {k: EdgeEncoder(bundle, be) for k, be in backends.items()}
    decoders = {k: ServerDecoder(bundle, be) for k, be in backends.items()}
    mismatches = decoded = 0
    for img in images:
        for enc in encoders.values():
            res = enc.analyze(img)
            assert pkt.parse(res.packet, decoders["onnxruntime"].expect).flags & pkt.FLAG_INT_HYPER
            y_hats = []
            for dec in decoders.values():
                try:
                    y_hat, syms, idx = dec.decode_latent(res.packet)
                except IndexMismatchError:
                    mismatches += 1
                    continue
                decoded += 1
                assert np.array_equal(idx, res.idx)
                assert all(np.array_equal(syms[k], res.symbols[k]) for k in syms)
                y_hats.append(y_hat)
            for other in y_hats[1:]:  # ŷ bit-identical whatever the decoder's engine
                assert np.array_equal(other.view(np.uint32), y_hats[0].view(np.uint32))
    return mismatches, decoded


def test_cross_backend_encode_decode_finds_zero_mismatches(stressed_bundle, backends):
    """Every (encoder, decoder) pair over 40 images — torch FP32, torch FP16, ONNX Runtime on 1 and 4
    threads (the integer graph's GEMMs split differently): identical symbols, indexes and ŷ."""
    bundle = load_bundle(stressed_bundle)
    mismatches, decoded = _cross(bundle, backends, CROSS_IMAGES)
    assert mismatches == 0
    assert decoded == len(CROSS_IMAGES) * len(backends) ** 2


def test_float_path_across_fp16_and_fp32_is_an_explicit_error_never_garbage(stressed_bundle, backends):
    """What the integer path prevents: FP16 vs FP32 hyper-synthesis flips indexes. Each packet either
    decodes exactly or raises IndexMismatchError; with this model some do raise."""
    bundle = load_bundle(stressed_bundle)
    enc = EdgeEncoder(bundle, backends["torch-fp16"], hyper="float")
    dec = ServerDecoder(bundle, backends["onnxruntime"])
    raised = 0
    for img in CROSS_IMAGES[:20]:
        res = enc.analyze(img)
        assert not pkt.parse(res.packet, dec.expect).flags & pkt.FLAG_INT_HYPER
        try:
            _, syms, _ = dec.decode_latent(res.packet)
        except IndexMismatchError:
            raised += 1
            continue
        assert all(np.array_equal(syms[k], res.symbols[k]) for k in syms)
    assert raised > 0


def test_decoder_side_disagreement_on_the_int_path_is_an_explicit_error(stressed_bundle):
    enc = EdgeEncoder(stressed_bundle, "onnxruntime")
    data = enc.encode(CROSS_IMAGES[0])
    dec = ServerDecoder(stressed_bundle, "onnxruntime")
    real = dec._hyper_for(pkt.FLAG_INT_HYPER)

    class OneOff(IntHyper):
        def index_means(self, z_symbols):
            idx, means = real.index_means(z_symbols)
            idx = idx.copy()
            idx.flat[idx.size // 2] ^= 1
            return idx, means

    dec._hypers[pkt.FLAG_INT_HYPER] = OneOff(real.session)
    with pytest.raises(IndexMismatchError):
        dec.decode(data)


# ---------------------------------------------------------------------------------------------
# the integer path itself, on the stressed model's bundle
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int_hyper(stressed_bundle):
    return make_hyper(load_bundle(stressed_bundle), None, "int")


@pytest.mark.parametrize("kind", ["typical", "wide", "extremes", "int32-edges"])
def test_int_graph_equals_exact_integer_reference(stressed_bundle, int_hyper, kind):
    """The bundle's graph on ONNX Runtime = the numpy reference = int64 einsums, bit for bit, on ẑ in
    the support, far outside it and at the int32 edges (a hostile packet's)."""
    from test_hyper_exact import _int64_reference

    params = int_hyper.params
    rng = np.random.default_rng(hash(kind) % 2**32)
    shape = params.in_shape
    z = {"typical": lambda: rng.integers(-4, 5, shape),
         "wide": lambda: rng.integers(-3000, 3000, shape),
         "extremes": lambda: rng.choice([*params.z_clip, 0, 1], shape),
         "int32-edges": lambda: rng.choice([np.iinfo(np.int32).min, np.iinfo(np.int32).max], shape)}[kind]()
    z = z.astype(np.int32)
    np.testing.assert_array_equal(params.accumulate(z), _int64_reference(params, z))
    want = np.concatenate(params.reference(z))
    np.testing.assert_array_equal(int_hyper.session.outputs(z).view(np.uint32), want.view(np.uint32))
    idx, means = int_hyper.index_means(z)
    tables = len(load_bundle(stressed_bundle).codec.scale_table)
    assert idx.dtype == np.int32 and idx.min() >= 0 and idx.max() < tables
    assert np.isfinite(means).all()


def test_int_path_is_close_to_the_float_path(stressed_model, stressed_bundle):
    """24 bits per partial sum bound the precision (README): on this stressed model ~98 % of the scale
    indexes equal the float path's (a flip moves to the neighbouring scale), means within ~0.02, and the
    packets — what matters — within +0.5 % of the float path's (len() of real packets)."""
    from splitbits.export.hyper_int import compare_with_float

    b = load_bundle(stressed_bundle)
    res = {mode: EdgeEncoder(b, "onnxruntime", hyper=mode).analyze_batch(CROSS_IMAGES) for mode in ("int", "float")}
    z = np.stack([r.symbols["z"] for r in res["int"]])
    c = b.codec
    rep = compare_with_float(make_hyper(b, None, "int").params, stressed_model.bottleneck_layer, z, c.z_medians,
                             c.scale_table, c.scale_bound)
    assert rep.idx_agreement > 0.97
    assert rep.mean_abs_mean_error < 0.005 and rep.max_abs_mean_error < 0.05
    sizes = {mode: np.mean([len(r.packet) for r in rs]) for mode, rs in res.items()}
    assert sizes["int"] < 1.005 * sizes["float"]


def test_packets_flag_the_path_and_both_paths_decode(stressed_bundle):
    b = load_bundle(stressed_bundle)
    dec = ServerDecoder(b, "onnxruntime")
    for mode, flag in (("int", pkt.FLAG_INT_HYPER), ("float", 0), (None, pkt.FLAG_INT_HYPER)):
        enc = EdgeEncoder(b, "onnxruntime", hyper=mode)
        res = enc.analyze(CROSS_IMAGES[1])
        assert pkt.parse(res.packet, dec.expect).flags == flag
        _, _, idx = dec.decode_latent(res.packet)
        np.testing.assert_array_equal(idx, res.idx)


def test_verify_checks_the_int_path_bit_for_bit(stressed_bundle):
    from splitbits.runtime.verify import verify_bundle

    rep = verify_bundle(stressed_bundle, "onnxruntime", raise_on_fail=False)
    assert rep.ok, rep.problems
    assert rep.symbol_ties.get("idx_int") == 0
    manifest = json.loads((stressed_bundle / MANIFEST).read_text())
    assert {"hyper_int.npz", "hyper_int.onnx"} <= set(manifest["files"]) and manifest["golden"]["hyper"] == "int"


def _rewritten(stressed_bundle, tmp_path, drop: tuple[str, ...] = (), write: dict | None = None):
    """A copy of the bundle without the files ``drop`` and with ``write`` {name: bytes}, the manifest
    (hashes, fingerprint) made consistent again: only the int path's files differ."""
    from splitbits.runtime.bundle import sha256_file

    out = tmp_path / "copy"
    shutil.copytree(stressed_bundle, out)
    manifest = json.loads((out / MANIFEST).read_text())
    for name in drop:
        (out / name).unlink()
        del manifest["files"][name]
    for name, data in (write or {}).items():
        (out / name).write_bytes(data)
        manifest["files"][name] = {"sha256": sha256_file(out / name), "bytes": len(data)}
    manifest["fingerprint"] = fingerprint_of(manifest["files"])
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def test_bundle_without_int_path_falls_back_to_float(stressed_bundle, tmp_path):
    old = _rewritten(stressed_bundle, tmp_path, drop=("hyper_int.npz", "hyper_int.onnx"))
    enc = EdgeEncoder(old, "onnxruntime")
    assert enc.hyper.name == "float"
    with pytest.raises(BundleError, match="hyper_int"):
        EdgeEncoder(old, "onnxruntime", hyper="int")
    dec = ServerDecoder(old, "onnxruntime")
    assert dec.decode(enc.encode(CROSS_IMAGES[0])).shape == (10,)


def _npz_bytes(arrays: dict) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_previous_format_bundle_is_refused_with_re_export(stressed_bundle, tmp_path):
    """A bundle whose hyper_int.npz is the previous (float64, format 1) one: refused, saying to re-export;
    no second runtime path is kept for it."""
    with np.load(stressed_bundle / "hyper_int.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays["meta"]))
    meta["format_version"] = 1
    arrays["meta"] = np.array(json.dumps(meta))
    old = _rewritten(stressed_bundle, tmp_path, drop=("hyper_int.onnx",), write={"hyper_int.npz": _npz_bytes(arrays)})
    with pytest.raises(BundleError, match="re-export"):
        EdgeEncoder(old, "onnxruntime")
    assert EdgeEncoder(old, "onnxruntime", hyper="float").hyper.name == "float"


def test_a_graph_file_that_is_not_the_parameters_graph_is_refused(stressed_bundle, tmp_path):
    graph = (stressed_bundle / "hyper_int.onnx").read_bytes()
    pos = len(graph) // 2  # one bit in a weight: still a valid model, not the validated one
    forged = graph[:pos] + bytes([graph[pos] ^ 1]) + graph[pos + 1:]
    bad = _rewritten(stressed_bundle, tmp_path, write={"hyper_int.onnx": forged})
    with pytest.raises(BundleError, match="not the graph"):
        EdgeEncoder(bad, "onnxruntime")


@pytest.mark.parametrize("damage", ["weight", "shift", "clip", "shape", "meta", "garbage"])
def test_damaged_int_parameters_are_bundle_errors(stressed_bundle, tmp_path, damage):
    path = tmp_path / "hyper_int.npz"
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    else:
        with np.load(stressed_bundle / "hyper_int.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        if damage == "weight":  # one weight far beyond what the 2**24 bound allows
            arrays["w1"] = arrays["w1"].copy()
            arrays["w1"].flat[0] = 1 << 22
        elif damage == "shift":
            arrays["shift0"] = arrays["shift0"] * 0 - 1
        elif damage == "clip":
            arrays["clip1"] = arrays["clip1"] * 0
        elif damage == "shape":
            arrays["b0"] = arrays["b0"][:, :-1]
        else:
            meta = json.loads(str(arrays["meta"]))
            meta["format_version"] = 99
            arrays["meta"] = np.array(json.dumps(meta))
        np.savez(path, **arrays)
    with pytest.raises(BundleError):
        IntHyperParams.load(path)


# ---------------------------------------------------------------------------------------------
# the sc2bench-architecture ResNet-50 at 224
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
    """The untrained ResNet-50 MSHP student, stressed like the tiny one, exported at 224 (4 golden
    images), and 3 further images."""
    from splitbits.export.bundle import export_bundle

    model = _stressed("resnet50", 224, 1000)
    images = _images(7, size=224, seed=3)
    path = export_bundle(model, tmp_path_factory.mktemp("r50") / "mshp", images=images[:4]).path
    return model, load_bundle(path), images[4:]


def test_resnet50_cross_backend_encode_decode_finds_zero_mismatches(resnet50):
    """torch FP32, torch FP16 (simulated engine), ONNX Runtime on 1 and 4 threads, each pair, at 224."""
    from splitbits.export.torch_backend import TorchBackend
    from splitbits.runtime.backends import get_backend

    model, bundle, images = resnet50
    res = EdgeEncoder(bundle, "onnxruntime").analyze_batch(images)
    assert len(np.unique(np.concatenate([r.idx.ravel() for r in res]))) >= 10  # not a trivial latent
    backends = {"torch-fp32": TorchBackend(copy.deepcopy(model)),
                "torch-fp16": TorchBackend(copy.deepcopy(model), dtype=torch.float16),
                "onnxruntime": get_backend("onnxruntime"),
                "onnxruntime-4-threads": get_backend("onnxruntime", threads=4)}
    mismatches, decoded = _cross(bundle, backends, images)
    assert mismatches == 0
    assert decoded == len(images) * len(backends) ** 2
