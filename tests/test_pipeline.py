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


# ---------------------------------------------------------------------------------------------
# packet format version 2 (what the edge writes) and version 1 (still read)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,frame", [("fp", 6), ("mshp", 9)])
def test_edge_writes_version_2_with_one_stream(family, frame, pipes, images):
    from splitbits.runtime import packet as pkt

    enc, dec = pipes[family]
    res = enc.analyze(images[0])
    p = pkt.parse(res.packet, dec.expect)
    assert p.version == 2 and len(p.blobs) == 1
    assert len(res.packet) - p.payload_bytes == frame  # tag, fingerprint tag[, idx check], CRC


def _as_version_1(enc: EdgeEncoder, res) -> bytes:
    """The packet version 1 made for this image: one section blob per latent, the 45/35-byte frame."""
    from splitbits.runtime import packet as pkt
    from splitbits.runtime.quant import index_checksum

    names = ["z", "y"] if enc.family == "mshp" else ["y"]
    blobs = [enc.coder.encode(res.symbols[k], *res.coded_with[k]) for k in names]
    crc = index_checksum(res.idx) if res.idx is not None else 0
    flags = enc.hyper.flag if enc.hyper is not None else 0
    return pkt.pack(pkt.Packet(enc.family, enc.coder.coder_id, bytes.fromhex(enc.bundle.fingerprint)[:8],
                               [res.symbols[k].shape for k in names], blobs, crc, flags, version=1))


@pytest.mark.parametrize("family", FAMILIES)
def test_version_1_packets_still_decode(family, pipes, images):
    enc, dec = pipes[family]
    for img in images[:3]:
        res = enc.analyze(img)
        old = _as_version_1(enc, res)
        assert len(old) > len(res.packet)
        new_out, old_out = dec.decode_full(res.packet), dec.decode_full(old)
        for k, v in res.symbols.items():
            np.testing.assert_array_equal(old_out.symbols[k], v)
            np.testing.assert_array_equal(new_out.symbols[k], v)
        np.testing.assert_array_equal(old_out.logits, new_out.logits)
    flipped = bytearray(old)
    flipped[-1] ^= 1
    with pytest.raises(PacketError, match="checksum"):
        dec.decode(bytes(flipped))


def test_version_2_idx_check_refuses_other_scale_indexes(pipes, images):
    """The 24-bit idx check (CRC fixed up, so the frame is valid) is what stops a stream decoded with
    scale indexes other than the encoder's."""
    import struct
    import zlib

    enc, dec = pipes["mshp"]
    data = bytearray(enc.encode(images[0]))
    data[2] ^= 0x01
    body = bytes(data[:-4])
    forged = body + struct.pack("<I", zlib.crc32(dec.expect.fingerprint + body))
    with pytest.raises(IndexMismatchError):
        dec.decode(forged)


def test_packet_for_another_bundle_is_refused(pipes, images):
    from splitbits.runtime.errors import WrongBundleError

    fp_packet = pipes["fp"][0].encode(images[0])
    mshp_dec = pipes["mshp"][1]
    err = WrongBundleError if fp_packet[1] != mshp_dec.expect.fingerprint[0] else PacketError
    with pytest.raises(err):
        mshp_dec.decode(fp_packet)


def test_ideal_bits_are_bookkeeping_outside_the_edge_stages(pipes, images):
    """The likelihood estimate is computed when first read, not inside the timed edge stages."""
    enc, _ = pipes["mshp"]
    res = enc.analyze(images[0])
    assert "ideal_bits" not in vars(res)  # not computed by analyze()
    c = enc.codec
    want = {"z": c.z_tables.ideal_bits(res.symbols["z"], res.coded_with["z"][0]),
            "y": c.y_tables.ideal_bits(res.symbols["y"], res.idx)}
    assert res.ideal_bits == want and set(res.timings_ms) >= {"quantize", "hyper", "encode", "packet"}
