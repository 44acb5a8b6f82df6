"""Edge encoder → packet → server decoder on ONNX Runtime, against the torch/compressai reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitbits.runtime.errors import IndexMismatchError, InputError, PacketError
from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder
from splitbits.runtime.verify import golden_packets, load_golden

FAMILIES = ["fp", "mshp"]


@pytest.fixture(scope="module")
def pipes(tiny_bundles):
    return {f: (EdgeEncoder(p, "onnxruntime"), ServerDecoder(p, "onnxruntime")) for f, p in tiny_bundles.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_payload_matches_compressai_within_1pct_16b(family, pipes, tiny_models, images):
    enc, _ = pipes[family]
    model = tiny_models[family]
    from splitbits.runtime import packet as pkt

    for img in images:
        res = enc.analyze(img)
        payload = pkt.parse(res.packet, ServerDecoder(enc.bundle, "onnxruntime").expect).payload_bytes
        x = torch.from_numpy(img.transpose(2, 0, 1)[None] / 255.0).float()
        ref = model.compress_reference(x)
        ref_bytes = sum(len(s) for strings in ref["strings"] for s in strings)
        assert payload <= ref_bytes * 1.01 + 16, (payload, ref_bytes)
        # the likelihood estimate is reported beside the real size, never instead of it
        assert abs(sum(res.ideal_bits.values()) / 8 - payload) <= 0.02 * payload + 16


@pytest.mark.parametrize("family", FAMILIES)
def test_top1_identical_to_torch_compress_decompress(family, pipes, tiny_models, images):
    enc, dec = pipes[family]
    model = tiny_models[family]
    for img in images:
        x = torch.from_numpy(img.transpose(2, 0, 1)[None] / 255.0).float()
        ref = model.compress_reference(x)
        ref_logits = model.decompress_reference(ref["strings"], ref["shape"]).numpy()[0]
        res = dec.decode_full(enc.encode(img))
        assert res.logits.argmax() == ref_logits.argmax()
        np.testing.assert_allclose(res.logits, ref_logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_packets_decode_exactly(family, tiny_bundles, pipes):
    _, dec = pipes[family]
    g = load_golden(dec.bundle)
    for i, p in enumerate(golden_packets(g)):
        _, syms, _ = dec.decode_latent(p)
        for k, v in syms.items():
            np.testing.assert_array_equal(v, g[f"{k}_symbols"][i])


def test_batch_encode_equals_single(pipes, images):
    enc, dec = pipes["mshp"]
    batch = enc.encode_batch(images[:3])
    assert batch == [enc.encode(im) for im in images[:3]]
    logits = dec.decode_batch(batch)
    np.testing.assert_allclose(logits[1], dec.decode(batch[1]), atol=1e-5)


def test_float_and_uint8_inputs_agree(pipes, images):
    enc, _ = pipes["fp"]
    assert enc.encode(images[0]) == enc.encode(images[0].transpose(2, 0, 1).astype(np.float32) / 255)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((32, 32, 3), np.uint8), "64x64x3"),
    (np.zeros((64, 64), np.uint8), "64x64x3"),
    (np.zeros((3, 64, 64), np.int16), "dtype"),
    (np.full((3, 64, 64), np.nan, np.float32), "NaN"),
    (np.full((3, 64, 64), 2.0, np.float32), r"\[0, 1\]"),
    ([[1, 2]], "numpy"),
])
def test_bad_images_are_clear_errors(pipes, bad, match):
    enc, _ = pipes["mshp"]
    with pytest.raises(InputError, match=match):
        enc.encode(bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_truncated_and_corrupted_packets(family, pipes, images):
    enc, dec = pipes[family]
    data = enc.encode(images[0])
    for cut in (0, 5, len(data) // 2, len(data) - 1):
        with pytest.raises(PacketError):
            dec.decode(data[:cut])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    with pytest.raises(PacketError):
        dec.decode(bytes(flipped))
    assert dec.decode(data).shape == (10,)  # the decoder keeps working after errors


def test_index_mismatch_is_an_explicit_error(tiny_bundles, pipes, images):
    """If the server's float hyper-synthesis disagrees with the edge's, decoding refuses (no garbage)."""
    enc = EdgeEncoder(tiny_bundles["mshp"], "onnxruntime", hyper="float")
    data = enc.encode(images[1])
    dec = ServerDecoder(tiny_bundles["mshp"], "onnxruntime")
    real = dec._hyper_for(0)

    class Skewed:
        flag = 0

        def __call__(self, z_hat):
            scales, means = real(z_hat)
            return scales + 5.0, means

    dec._hypers[0] = Skewed()
    with pytest.raises(IndexMismatchError):
        dec.decode(data)
