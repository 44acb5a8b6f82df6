"""The packet parser treats its input as hostile: every defect is a PacketError subclass."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitbits.runtime import packet as pkt
from splitbits.runtime.errors import PacketError, VersionError, WrongBundleError

FP8 = bytes(range(8))
EXPECT = pkt.Expect(family="mshp", fingerprint=FP8, shapes=[(8, 4, 4), (12, 15, 15)], max_bytes=100_000,
                    coder_ids=frozenset({1, 2}))


def good_packet() -> bytes:
    return pkt.pack(pkt.Packet("mshp", 1, FP8, [(8, 4, 4), (12, 15, 15)], [b"abc", b"defgh"], idx_crc=77))


def test_roundtrip():
    p = pkt.parse(good_packet(), EXPECT)
    assert p.family == "mshp" and p.coder_id == 1 and p.idx_crc == 77
    assert [bytes(b) for b in p.blobs] == [b"abc", b"defgh"]
    assert p.payload_bytes == 8


def test_every_truncation_is_an_error():
    data = good_packet()
    for n in range(len(data)):
        with pytest.raises(PacketError):
            pkt.parse(data[:n], EXPECT)


def test_every_single_bit_flip_is_an_error():
    data = bytearray(good_packet())
    for i in range(len(data)):
        for bit in range(8):
            data[i] ^= 1 << bit
            with pytest.raises(PacketError):
                pkt.parse(bytes(data), EXPECT)
            data[i] ^= 1 << bit


def _recrc(body: bytes) -> bytes:
    import zlib

    return body + struct.pack("<I", zlib.crc32(body))


def test_wrong_version():
    data = bytearray(good_packet())
    data[4] = 2
    with pytest.raises(VersionError):
        pkt.parse(_recrc(bytes(data[:-4])), EXPECT)


def test_wrong_bundle():
    data = pkt.pack(pkt.Packet("mshp", 1, b"\x99" * 8, [(8, 4, 4), (12, 15, 15)], [b"a", b"b"]))
    with pytest.raises(WrongBundleError):
        pkt.parse(data, EXPECT)


def test_wrong_shape_family_and_section_count():
    for p in [
        pkt.Packet("mshp", 1, FP8, [(8, 4, 4), (12, 15, 16)], [b"a", b"b"]),
        pkt.Packet("fp", 1, FP8, [(12, 15, 15)], [b"a"]),
        pkt.Packet("mshp", 1, FP8, [(8, 4, 4)], [b"a"]),
        pkt.Packet("mshp", 9, FP8, [(8, 4, 4), (12, 15, 15)], [b"a", b"b"]),
    ]:
        with pytest.raises(PacketError):
            pkt.parse(pkt.pack(p), EXPECT)


def test_oversized_is_refused_before_parsing():
    big = pkt.pack(pkt.Packet("mshp", 1, FP8, [(8, 4, 4), (12, 15, 15)], [b"a" * 200_000, b"b"]))
    with pytest.raises(PacketError, match="exceeds"):
        pkt.parse(big, EXPECT)


def test_lying_section_length():
    data = bytearray(good_packet())
    struct.pack_into("<I", data, pkt._HEAD.size + 6, 2**32 - 1)  # first section claims 4 GiB
    with pytest.raises(PacketError):
        pkt.parse(_recrc(bytes(data[:-4])), EXPECT)


def test_not_bytes():
    with pytest.raises(PacketError):
        pkt.parse("hello", EXPECT)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash(data):
    with contextlib.suppress(PacketError):
        pkt.parse(data, EXPECT)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=60), st.integers(0, 10_000))
def test_mutated_valid_packets_with_fixed_crc(junk, pos):
    """Even a packet whose CRC was recomputed after tampering parses or fails cleanly."""
    data = bytearray(good_packet()[:-4])
    pos %= len(data)
    data[pos:pos + len(junk)] = junk
    try:
        p = pkt.parse(_recrc(bytes(data)), EXPECT)
    except PacketError:
        return
    assert sum(len(b) for b in p.blobs) <= EXPECT.max_bytes
    assert np.all([s == e for s, e in zip(p.shapes, EXPECT.shapes)])
