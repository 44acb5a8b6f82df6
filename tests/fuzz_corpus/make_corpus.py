"""Regenerate the fuzz corpus: ``python tests/fuzz_corpus/make_corpus.py`` (the files are committed).

A small synthetic "bundle" (tables, an integer hyper path, fixed fingerprint and shapes, in
``fuzz_bundle.npz`` / ``hyper_int.npz`` and its graph ``hyper_int.onnx``) and packets for it, in both
format versions (the same random draws as before version 2 existed, then version 2's; MSHP packets
follow the integer hyper path's scale indexes, so they change with its format): valid ones of both
families and both coders (``valid-*``, ``-v2`` for version 2), and malformed ones (``bad-*``) that
must be refused with a PacketError at a known stage (``bad-blob-*`` by a coder, ``bad-idx-*`` by the
scale-index check, every other one by the parser): truncated, bit-flipped, oversized, wrong version,
wrong bundle, wrong family/shape/section count/tag, unknown coder, and hostile blobs behind a *valid*
CRC (so the decoders, not the CRC, must cope). ``flip-*`` and ``hostile-*`` (bit flips and random
streams behind valid CRCs) may stop at any stage but the parser.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np

from splitbits.runtime import packet as pkt
from splitbits.runtime.codec import CdfTables, get_coder
from splitbits.runtime.hyper_int import SLOPE_BITS
from splitbits.runtime.quant import index_checksum

HERE = Path(__file__).parent
FP8 = bytes.fromhex("5eedf00d0badcafe")
FP32 = FP8 + bytes.fromhex("9e3779b97f4a7c15f39cc0605cedc8341082276bf3a27251")  # the full fingerprint
Z_SHAPE, Y_SHAPE = (4, 3, 3), (6, 5, 5)
SCALES = np.exp(np.linspace(np.log(0.11), np.log(20.0), 8)).astype(np.float32)


def _tables(rng: np.random.Generator, num: int, spread: float) -> CdfTables:
    lengths = rng.integers(4, 24, num)
    cdf = np.zeros((num, int(lengths.max())), np.int32)
    for t, ln in enumerate(lengths):
        x = np.arange(ln - 1) - (ln - 2) / 2
        w = np.exp(-0.5 * (x / (spread * (t + 1))) ** 2) + 1e-3
        f = np.maximum(1, np.floor(w / w.sum() * (65536 - ln))).astype(np.int64)
        f[np.argmax(f)] += 65536 - f.sum()
        cdf[t, :ln] = np.concatenate(([0], np.cumsum(f)))
    return CdfTables.create(cdf, lengths, -(lengths // 2))


def _hyper_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """An integer hyper path (``hyper_int.npz`` format 2) within its exactness bounds (the same random
    draws as format 1's, so every other draw of the corpus is unchanged)."""
    meta = {"format_version": 2, "in_shape": list(Z_SHAPE), "out_shape": list(Y_SHAPE), "z_clip": [-12, 12],
            "layers": [{"transposed": True, "stride": 2, "padding": 1, "slope": round(0.01 * (1 << SLOPE_BITS))},
                       {"transposed": False, "stride": 1, "padding": 1}]}
    w0 = rng.integers(-3000, 3000, (4, 4, 3, 3)).astype(np.int32)
    b0 = rng.integers(-5000, 5000, (4, 5, 5)).astype(np.int64)
    w1 = (rng.integers(-3000, 3000, (12, 4, 3, 3)) // 16).astype(np.int32)
    return {"w0": w0, "b0": b0, "shift0": np.full(4, 10, np.int64), "clip0": np.full(4, 1000, np.int64),
            "w1": w1, "b1": np.zeros(12, np.int64), "shift1": np.full(12, 14, np.int64),
            "meta": np.array(json.dumps(meta))}


def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def _symbols(rng: np.random.Generator, params):
    """Per coder: three MSHP (z, idx, y) symbol sets (z small, all int32-min, wide; y with int32 extremes every
    7th value), then one FP y — the random draws in the corpus's order, shared by both format versions."""
    for coder_name in ("numba", "constriction"):
        mshp = []
        for zsym in [rng.integers(-3, 4, Z_SHAPE), np.full(Z_SHAPE, np.iinfo(np.int32).min),
                     rng.integers(-100, 100, Z_SHAPE)]:
            zsym = zsym.astype(np.int32)
            idx, _ = params.index_means(zsym)
            ysym = rng.integers(-4, 5, Y_SHAPE).astype(np.int32)
            ysym.flat[::7] = rng.integers(-(2**31), 2**31 - 1, ysym.flat[::7].size)
            mshp.append((zsym, idx, ysym))
        yfp = rng.integers(-5, 6, Y_SHAPE).astype(np.int32)
        yfp.flat[3] = np.iinfo(np.int32).max
        yield coder_name, get_coder(coder_name), mshp, yfp


def _version1(rng: np.random.Generator, params, tables: tuple[CdfTables, ...], zidx: np.ndarray,
              yidx_fp: np.ndarray) -> dict[str, bytes]:
    """Version-1 packets (as before version 2: byte-identical files), valid and broken."""
    z_tables, y_tables, fp_tables = tables
    files: dict[str, bytes] = {}
    for coder_name, coder, mshp, yfp in _symbols(rng, params):
        for k, (zsym, idx, ysym) in enumerate(mshp):
            blobs = [coder.encode(zsym, zidx, z_tables), coder.encode(ysym, idx, y_tables)]
            p = pkt.Packet("mshp", coder.coder_id, FP8, [Z_SHAPE, Y_SHAPE], blobs, index_checksum(idx),
                           pkt.FLAG_INT_HYPER, version=1)
            files[f"valid-mshp-{coder_name}-{k}"] = pkt.pack(p)
        files[f"valid-fp-{coder_name}"] = pkt.pack(pkt.Packet("fp", coder.coder_id, FP8, [Y_SHAPE],
                                                              [coder.encode(yfp, yidx_fp, fp_tables)], version=1))
    base = files["valid-mshp-numba-0"]
    fpbase = files["valid-fp-numba"]
    head = pkt._HEAD.size + 2 * pkt._SECTION.size
    bad: dict[str, bytes] = {
        "bad-empty": b"", "bad-magic": b"XXXX" + base[4:], "bad-truncated-header": base[:10],
        "bad-truncated-body": base[:-7], "bad-one-byte-short": base[:-1], "bad-trailing-byte": base + b"\x00",
        "bad-crc": base[:-1] + bytes([base[-1] ^ 0x55]),
        "bad-version": _recrc(base[:4] + bytes([2]) + base[5:-4]),
        "bad-wrong-bundle": _recrc(base[:8] + b"\x00" * 8 + base[16:-4]),
        "bad-family": _recrc(base[:5] + bytes([1]) + base[6:-4]),
        "bad-coder-id": _recrc(base[:6] + bytes([9]) + base[7:-4]),
        "bad-sections": _recrc(base[:20] + bytes([3]) + base[21:-4]),
        "bad-shape": _recrc(base[:21] + struct.pack("<H", 5) + base[23:-4]),
        "bad-section-length": _recrc(base[:27] + struct.pack("<I", 10**6) + base[31:-4]),
        "bad-idx-crc": _recrc(base[:16] + b"\x01\x02\x03\x04" + base[20:-4]),
        "bad-oversized": pkt.pack(pkt.Packet("mshp", 2, FP8, [Z_SHAPE, Y_SHAPE], [b"\x00" * 10, b"\x00" * 6000],
                                             version=1)),
        "bad-fp-as-mshp-flag": _recrc(fpbase[:7] + bytes([1]) + fpbase[8:-4]),
        "bad-unknown-flag": _recrc(base[:7] + bytes([0x81]) + base[8:-4]),
    }
    # hostile blobs behind a valid CRC: the coders must refuse them
    zlen = struct.unpack_from("<I", base, pkt._HEAD.size + 6)[0]
    zblob = base[head:head + zlen]
    hostile_z = {
        "bad-blob-lanes": bytes([7]) + zblob[1:], "bad-blob-state-bytes": bytes([0x38]) + zblob[1:],
        "bad-blob-high-bits": bytes([zblob[0] | 0x80]) + zblob[1:], "bad-blob-small-state": bytes([0, 1, 0, 0]),
        "bad-blob-random": rng.integers(0, 256, zlen, dtype=np.uint8).tobytes(),
        "bad-blob-zero": b"\x00" * zlen, "bad-blob-ff": b"\xff" * zlen, "bad-blob-truncated": zblob[:-1],
        "bad-blob-extended": zblob + b"\x00\x00\x00\x00", "bad-blob-empty": b"",
        "bad-blob-overlong-escape": zblob + b"\xff" * 6,
    }
    for name, blob in hostile_z.items():
        rest = base[head + zlen:-4]
        sec = struct.pack("<HHHI", *Z_SHAPE, len(blob))
        body = base[:pkt._HEAD.size] + sec + base[pkt._HEAD.size + 10:head] + blob + rest
        bad[name] = _recrc(body)
    for i in range(40):  # random single-bit flips with the CRC fixed up
        b = bytearray(base[:-4])
        pos = int(rng.integers(head, len(b)))
        b[pos] ^= 1 << int(rng.integers(0, 8))
        bad[f"flip-{i:02d}-at-{pos}"] = _recrc(bytes(b))
    files.update(bad)
    return files

def _recrc2(body: bytes, fingerprint: bytes = FP32) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body, zlib.crc32(fingerprint)))


def _version2(rng: np.random.Generator, params, tables: tuple[CdfTables, ...], zidx: np.ndarray,
              yidx_fp: np.ndarray) -> dict[str, bytes]:
    """Version-2 packets: valid ones (z escapes included), and each field of the frame broken."""
    z_tables, y_tables, fp_tables = tables
    files: dict[str, bytes] = {}
    for coder_name, coder, mshp, yfp in _symbols(rng, params):
        for k, (zsym, idx, ysym) in enumerate(mshp):
            blob = coder.encode_stream([(zsym, zidx, z_tables), (ysym, idx, y_tables)])
            files[f"valid-mshp-{coder_name}-v2-{k}"] = pkt.pack(pkt.Packet(
                "mshp", coder.coder_id, FP32, [], [blob], index_checksum(idx), pkt.FLAG_INT_HYPER))
        blob = coder.encode_stream([(yfp, yidx_fp, fp_tables)])
        files[f"valid-fp-{coder_name}-v2"] = pkt.pack(pkt.Packet("fp", coder.coder_id, FP32, [], [blob]))
    base, fpbase = files["valid-mshp-numba-v2-0"], files["valid-fp-numba-v2"]
    body, blob = base[:-4], base[5:-4]
    other = bytes([FP32[0] ^ 0xFF]) + FP32[1:]  # another bundle's fingerprint, and one with our first byte
    same_tag = FP32[:1] + bytes(31)
    files.update({
        "bad-v2-version": _recrc2(bytes([0x30 | base[0] & 0xF]) + body[1:]),
        "bad-v2-tag-is-v1-magic": _recrc2(b"S" + body[1:]),
        "bad-v2-truncated-tag": base[:1], "bad-v2-truncated-frame": base[:8],
        "bad-v2-wrong-bundle": _recrc2(body[:1] + other[:1] + body[2:], other),
        "bad-v2-wrong-bundle-same-tag": _recrc2(body, same_tag),
        "bad-v2-family": _recrc2(bytes([base[0] ^ 0x08]) + body[1:]),
        "bad-v2-coder-0": _recrc2(bytes([base[0] & 0xF9]) + body[1:]),
        "bad-v2-coder-3": _recrc2(bytes([base[0] | 0x06]) + body[1:]),
        "bad-v2-fp-with-flag": _recrc2(bytes([fpbase[0] | 1]) + fpbase[1:-4]),
        "bad-v2-crc": base[:-1] + bytes([base[-1] ^ 0x55]),
        "bad-v2-fingerprint-tag-flip": base[:1] + bytes([base[1] ^ 4]) + base[2:],
        "bad-v2-idx-flip": base[:3] + bytes([base[3] ^ 1]) + base[4:],
        "bad-v2-blob-flip": base[:20] + bytes([base[20] ^ 0x80]) + base[21:],
        "bad-v2-one-byte-short": base[:-1], "bad-v2-trailing-byte": base + b"\x00",
        "bad-v2-oversized": pkt.pack(pkt.Packet("mshp", 2, FP32, [], [b"\x00" * 6000], 0, 1)),
        "bad-idx-check-v2": _recrc2(body[:2] + bytes([body[2] ^ 1]) + body[3:]),
    })
    states = 1 + 3 + (blob[0] >> 3)  # header byte and lane 0's final state (one lane)
    hostile = {
        "lanes": bytes([7]) + blob[1:], "state-bytes": bytes([0x38]) + blob[1:],
        "high-bits": bytes([blob[0] | 0x80]) + blob[1:], "small-state": bytes([0, 1, 0, 0]),
        "zero": bytes(len(blob)), "ff": b"\xff" * len(blob), "empty": b"",
        "overlong-escape": blob[:states] + b"\xff" * 6 + blob[states:],  # where z's escapes begin
    }
    for name, hb in hostile.items():
        files[f"bad-blob-v2-{name}"] = _recrc2(body[:5] + hb)
    # cut or grown at the end, the words (read from the end) misalign: z goes wrong, the idx check or a coder refuses
    files["hostile-v2-truncated"] = _recrc2(body[:-1])
    files["hostile-v2-extended"] = _recrc2(body + bytes(4))
    cbase = files["valid-mshp-constriction-v2-0"]
    files["bad-blob-v2-constriction-length"] = _recrc2(cbase[:5] + b"\xff\x7f" + cbase[6:-4])
    files["bad-blob-v2-constriction-trailing"] = _recrc2(cbase[:-4] + b"\x00")
    for i in range(4):
        rand = rng.integers(0, 256, len(blob), dtype=np.uint8).tobytes()
        files[f"hostile-v2-random-{i}"] = _recrc2(body[:5] + bytes([i << 3]) + rand[1:])
    for i in range(40):  # random single-bit flips in the stream, the CRC fixed up
        b = bytearray(body)
        pos = int(rng.integers(5, len(b)))
        b[pos] ^= 1 << int(rng.integers(0, 8))
        files[f"flip-v2-{i:02d}-at-{pos}"] = _recrc2(bytes(b))
    return files


def main() -> None:
    from splitbits.runtime.hyper_int import IntHyperParams, IntHyperSession

    rng = np.random.default_rng(20240601)
    z_tables, y_tables, fp_tables = _tables(rng, 4, 1.5), _tables(rng, len(SCALES), 0.8), _tables(rng, 6, 2.0)
    arrays = {}
    for name, t in (("z", z_tables), ("y", y_tables), ("fp", fp_tables)):
        arrays.update({f"{name}_cdf": t.cdf, f"{name}_length": t.length, f"{name}_offset": t.offset})
    arrays.update(z_medians=rng.normal(0, 0.3, 4).astype(np.float32),
                  fp_medians=rng.normal(0, 0.3, 6).astype(np.float32),
                  scale_table=SCALES, fingerprint=np.frombuffer(FP32, np.uint8))
    np.savez(HERE / "fuzz_bundle.npz", **arrays)
    hyper = _hyper_arrays(rng)
    np.savez(HERE / "hyper_int.npz", **hyper)
    graph = IntHyperParams.load(HERE / "hyper_int.npz").graph()
    (HERE / "hyper_int.onnx").write_bytes(graph)
    params = IntHyperSession(IntHyperParams.load(HERE / "hyper_int.npz"), graph, SCALES, 0.11)  # as the server runs it

    for old in HERE.glob("*.bin"):
        old.unlink()
    zidx = np.broadcast_to(np.arange(4, dtype=np.int32)[:, None, None], Z_SHAPE)
    yidx_fp = np.broadcast_to(np.arange(6, dtype=np.int32)[:, None, None], Y_SHAPE)
    tables = (z_tables, y_tables, fp_tables)
    files = _version1(rng, params, tables, zidx, yidx_fp)
    files.update(_version2(rng, params, tables, zidx, yidx_fp))
    for name, data in files.items():
        (HERE / f"{name}.bin").write_bytes(data)
    print(f"wrote {len(files)} packets to {HERE}")


if __name__ == "__main__":
    main()
