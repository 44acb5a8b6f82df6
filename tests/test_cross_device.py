"""No silent corruption across devices (MSHP): encode with one backend, decode with another.

The integer hyper path (``splitbits.runtime.hyper_int``) computes the scale indexes and means from
the ẑ symbols with exact integer arithmetic, so an FP16 edge engine and an FP32 server agree bit for
bit; the float path can disagree, and then decoding is an explicit ``IndexMismatchError``.

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
from splitbits.runtime.hyper_int import A_MAX, IntHyperParams, requantize
from splitbits.runtime.pipeline import EdgeEncoder, IntHyper, ServerDecoder, make_hyper

pytestmark = pytest.mark.slow  # every test here uses the module's own export (stressed_bundle)


@pytest.fixture(scope="module")
def stressed_model():
    from splitbits.trainer.models import ModelSpec, build_model

    torch.manual_seed(0)
    m = build_model(ModelSpec(arch="tiny", family="mshp", num_classes=10, input_size=64)).eval()
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
    }


CROSS_IMAGES = _images(40, seed=5)


def test_fixture_spreads_the_indexes(stressed_bundle):
    enc = EdgeEncoder(stressed_bundle, "onnxruntime")
    res = enc.analyze_batch(CROSS_IMAGES[:8])
    assert len(np.unique(np.concatenate([r.idx.ravel() for r in res]))) >= 10
    assert any(np.abs(r.symbols["z"]).max() > 0 for r in res)


def test_cross_backend_encode_decode_finds_zero_mismatches(stressed_bundle, backends):
    """Every (encoder backend, decoder backend) pair over 40 images: identical symbols, indexes and ŷ."""
    bundle = load_bundle(stressed_bundle)
    encoders = {k: EdgeEncoder(bundle, be) for k, be in backends.items()}
    decoders = {k: ServerDecoder(bundle, be) for k, be in backends.items()}
    mismatches = decoded = 0
    for img in CROSS_IMAGES:
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
    assert mismatches == 0
    assert decoded == len(CROSS_IMAGES) * len(encoders) * len(decoders)


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

    dec._hypers[pkt.FLAG_INT_HYPER] = OneOff(real.params)
    with pytest.raises(IndexMismatchError):
        dec.decode(data)


# ---------------------------------------------------------------------------------------------
# the integer path itself
# ---------------------------------------------------------------------------------------------


def _reference_accumulate(params: IntHyperParams, z: np.ndarray) -> np.ndarray:
    """The integer path with int64 einsums (no BLAS, no floats): what the float64 GEMMs must equal."""
    a = np.clip(z.astype(np.int64), -A_MAX, A_MAX)
    for i, layer in enumerate(params.layers):
        w = layer.weight.astype(np.int64)
        k, s, p = layer.k, layer.stride, layer.padding
        _, h, wd = a.shape
        if layer.transposed:
            full = np.zeros((layer.cout, (h - 1) * s + k, (wd - 1) * s + k), np.int64)
            for ky in range(k):
                for kx in range(k):
                    full[:, ky:ky + (h - 1) * s + 1:s, kx:kx + (wd - 1) * s + 1:s] += np.einsum(
                        "io,ihw->ohw", w[:, :, ky, kx], a)
            ho, wo = layer.out_hw(h, wd)
            acc = full[:, p:p + ho, p:p + wo]
        else:
            ap = np.pad(a, ((0, 0), (p, p), (p, p)))
            ho, wo = layer.out_hw(h, wd)
            acc = np.zeros((layer.cout, ho, wo), np.int64)
            for ky in range(k):
                for kx in range(k):
                    acc += np.einsum("oi,ihw->ohw", w[:, :, ky, kx],
                                     ap[:, ky:ky + (ho - 1) * s + 1:s, kx:kx + (wo - 1) * s + 1:s])
        if i == 0:
            acc = acc + params.bias0
        if layer.shift is None:
            return acc
        a = requantize(acc, layer.shift, layer.slope)
    raise AssertionError


@pytest.fixture(scope="module")
def int_params(stressed_bundle):
    return make_hyper(load_bundle(stressed_bundle), None, "int").params


@pytest.mark.parametrize("kind", ["typical", "wide", "extremes", "int32-edges"])
def test_int_path_equals_exact_integer_reference(int_params, kind):
    rng = np.random.default_rng(hash(kind) % 2**32)
    shape = int_params.in_shape
    z = {"typical": lambda: rng.integers(-4, 5, shape),
         "wide": lambda: rng.integers(-3000, 3000, shape),
         "extremes": lambda: rng.choice([-A_MAX - 5, A_MAX + 5, 0, 1], shape),
         "int32-edges": lambda: rng.choice([np.iinfo(np.int32).min, np.iinfo(np.int32).max], shape)}[kind]()
    z = z.astype(np.int32)
    np.testing.assert_array_equal(int_params.accumulate(z), _reference_accumulate(int_params, z))
    idx, means = int_params.index_means(z)
    assert idx.dtype == np.int32 and idx.min() >= 0 and idx.max() < int_params.num_tables
    assert np.isfinite(means).all()


def test_int_path_is_close_to_the_float_path(stressed_model, stressed_bundle):
    from splitbits.export.hyper_int import compare_with_float

    b = load_bundle(stressed_bundle)
    enc = EdgeEncoder(b, "onnxruntime")
    z = np.stack([r.symbols["z"] for r in enc.analyze_batch(CROSS_IMAGES[:16])])
    c = b.codec
    rep = compare_with_float(make_hyper(b, None, "int").params, stressed_model.bottleneck_layer, z, c.z_medians,
                             c.scale_table, c.scale_bound)
    assert rep.idx_agreement > 0.995
    assert rep.max_abs_mean_error < 1e-3


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
    assert "hyper_int.npz" in manifest["files"] and manifest["golden"]["hyper"] == "int"


def test_bundle_without_int_path_falls_back_to_float(stressed_bundle, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(stressed_bundle, old)
    (old / "hyper_int.npz").unlink()
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["files"]["hyper_int.npz"]
    manifest["fingerprint"] = fingerprint_of(manifest["files"])
    (old / MANIFEST).write_text(json.dumps(manifest))
    enc = EdgeEncoder(old, "onnxruntime")
    assert enc.hyper.name == "float"
    with pytest.raises(BundleError, match="hyper_int"):
        EdgeEncoder(old, "onnxruntime", hyper="int")
    dec = ServerDecoder(old, "onnxruntime")
    assert dec.decode(enc.encode(CROSS_IMAGES[0])).shape == (10,)


@pytest.mark.parametrize("damage", ["weight", "shift", "thresholds", "shape", "meta", "garbage"])
def test_damaged_int_parameters_are_bundle_errors(stressed_bundle, tmp_path, damage):
    path = tmp_path / "hyper_int.npz"
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    else:
        with np.load(stressed_bundle / "hyper_int.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        if damage == "weight":
            arrays["w1"] = arrays["w1"].copy()
            arrays["w1"].flat[0] = 1 << 16
        elif damage == "shift":
            arrays["shift0"] = arrays["shift0"] * 0 - 1
        elif damage == "thresholds":
            arrays["thresholds"] = arrays["thresholds"][:, ::-1].copy()
        elif damage == "shape":
            arrays["bias0"] = arrays["bias0"][:, :-1]
        else:
            meta = json.loads(str(arrays["meta"]))
            meta["format_version"] = 99
            arrays["meta"] = np.array(json.dumps(meta))
        np.savez(path, **arrays)
    with pytest.raises(BundleError):
        IntHyperParams.load(path)
