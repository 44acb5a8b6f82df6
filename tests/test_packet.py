"""The packet parser treats its input as hostile: every defect is a PacketError subclass.

Version 2 (what the edge writes) field by field: each one's protection is shown by a test; version 1
is still parsed exactly as before."""

from __future__ import annotations

import contextlib
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitbits.runtime import packet as pkt
from splitbits.runtime.errors import PacketError, VersionError, WrongBundleError

FP32 = bytes(range(0x40, 0x60))  # a bundle's fingerprint
FP8 = FP32[:8]  # what version 1 carries
SHAPES = [(8, 4, 4), (12, 15, 15)]
EXPECT = pkt.Expect(family="mshp", fingerprint=FP32, shapes=SHAPES, max_bytes=100_000, coder_ids=frozenset({1, 2}))
EXPECT_FP = pkt.Expect(family="fp", fingerprint=FP32, shapes=SHAPES[1:], max_bytes=100_000,
                       coder_ids=frozenset({1, 2}))


def good_packet() -> bytes:
    """Version 1."""
    return pkt.pack(pkt.Packet("mshp", 1, FP8, SHAPES, [b"abc", b"defgh"], idx_crc=77, version=1))


def v2_packet(family: str = "mshp", coder_id: int = 2, blob: bytes = b"stream!", idx_crc: int = 0xABCDEF12,
              flags: int = 1, fingerprint: bytes = FP32) -> bytes:
    return pkt.pack(pkt.Packet(family, coder_id, fingerprint, [], [blob], idx_crc, flags if family == "mshp" else 0))


def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _recrc2(body: bytes, fingerprint: bytes = FP32) -> bytes:
    return body + struct.pack("<I", zlib.crc32(fingerprint + body))


# ---------------------------------------------------------------------------------------------
# version 2
# ---------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(family=st.sampled_from(["fp", "mshp"]), coder_id=st.sampled_from([1, 2]), flags=st.integers(0, 1),
       blob=st.binary(max_size=300), idx_crc=st.integers(0, 2**32 - 1))
def test_v2_roundtrip(family, coder_id, flags, blob, idx_crc):
    data = v2_packet(family, coder_id, blob, idx_crc, flags)
    assert len(data) == len(blob) + (9 if family == "mshp" else 6)  # the whole frame: 9 B MSHP, 6 B FP
    p = pkt.parse(data, EXPECT if family == "mshp" else EXPECT_FP)
    assert (p.version, p.family, p.coder_id) == (2, family, coder_id)
    assert p.flags == (flags if family == "mshp" else 0)
    assert p.idx_crc == (idx_crc & 0xFFFFFF if family == "mshp" else 0)
    assert [bytes(b) for b in p.blobs] == [blob] and p.payload_bytes == len(blob)
    assert p.shapes == (SHAPES if family == "mshp" else SHAPES[1:]) and p.fingerprint == FP32


def test_v2_layout():
    """Byte 0: version | family | coder | flag; byte 1: fingerprint tag; MSHP 2-4: idx check; CRC last."""
    data = v2_packet("mshp", 2, b"xyz", 0x12345678, 1)
    assert data[0] == 0x20 | 0x08 | (2 << 1) | 1 and data[1] == FP32[0]
    assert data[2:5] == bytes([0x78, 0x56, 0x34]) and data[5:8] == b"xyz"
    assert data[-4:] == struct.pack("<I", zlib.crc32(FP32 + data[:-4]))
    fp = v2_packet("fp", 1, b"xyz")
    assert fp[0] == 0x20 | (1 << 1) and fp[1] == FP32[0] and fp[2:5] == b"xyz"


def test_v2_every_tag_is_checked():
    """Of the 256 tags (CRC valid), exactly the bundle's family with a real coder and (MSHP only) the
    integer-hyper flag parse; another version is a VersionError (versions 0 and 1 are not a packet at all),
    the rest PacketErrors naming the field."""
    body = v2_packet("mshp")[1:-4]
    accepted = set()
    for tag in range(256):
        data = _recrc2(bytes([tag]) + body)
        if tag == ord("S"):  # a version-1 packet's first byte: parsed as version 1 (and refused there)
            with pytest.raises(PacketError, match=r"magic|truncated"):
                pkt.parse(data, EXPECT)
            continue
        if tag >> 4 < 2:  # versions 0 and 1 cannot be in a tag: not a packet at all
            with pytest.raises(PacketError, match="not a splitbits packet") as exc:
                pkt.parse(data, EXPECT)
            assert not isinstance(exc.value, VersionError)
            continue
        if tag >> 4 != 2:
            with pytest.raises(VersionError):
                pkt.parse(data, EXPECT)
            continue
        try:
            pkt.parse(data, EXPECT)
        except PacketError as exc:
            assert not isinstance(exc, (VersionError, WrongBundleError))
            assert any(w in str(exc) for w in ("family", "coder id", "flags")), exc
        else:
            accepted.add(tag)
    assert accepted == {0x20 | 0x08 | (c << 1) | f for c in (1, 2) for f in (0, 1)}
    with pytest.raises(PacketError, match="flags"):  # the integer-hyper flag on an FP packet
        pkt.parse(_recrc2(bytes([0x20 | 2 << 1 | 1]) + v2_packet("fp")[1:-4]), EXPECT_FP)


def test_v2_fingerprint_tag_names_a_wrong_bundle():
    other = bytes([FP32[0] ^ 0x5A]) + FP32[1:]
    with pytest.raises(WrongBundleError, match="made for bundle"):
        pkt.parse(v2_packet(fingerprint=other), EXPECT)


def test_v2_crc_catches_a_wrong_bundle_with_the_same_tag():
    """Another bundle whose fingerprint shares the first byte: the CRC, seeded with the full fingerprint, refuses it."""
    other = FP32[:1] + bytes(31)
    with pytest.raises(PacketError, match="checksum"):
        pkt.parse(v2_packet(fingerprint=other), EXPECT)


def test_v2_idx_check_is_carried_exactly():
    for crc in (0, 1, 0xFFFFFF, 0xFFFFFFFF, 0x80000000, 0x00ABCDEF):
        assert pkt.parse(v2_packet(idx_crc=crc), EXPECT).idx_crc == crc & 0xFFFFFF


@pytest.mark.parametrize("family", ["fp", "mshp"])
def test_v2_every_truncation_and_extension_is_an_error(family):
    data = v2_packet(family, blob=bytes(range(40)))
    expect = EXPECT if family == "mshp" else EXPECT_FP
    for n in range(len(data)):
        with pytest.raises(PacketError):
            pkt.parse(data[:n], expect)
    for extra in (b"\x00", b"\x01\x02\x03\x04", data[-4:]):
        with pytest.raises(PacketError):
            pkt.parse(data + extra, expect)


@pytest.mark.parametrize("family", ["fp", "mshp"])
def test_v2_every_single_bit_flip_is_an_error(family):
    """Tag, fingerprint tag, idx check, stream bytes and the CRC itself: every flip is refused."""
    data = bytearray(v2_packet(family, blob=bytes(range(0, 256, 7))))
    expect = EXPECT if family == "mshp" else EXPECT_FP
    for i in range(len(data)):
        for bit in range(8):
            data[i] ^= 1 << bit
            with pytest.raises(PacketError):
                pkt.parse(bytes(data), expect)
            data[i] ^= 1 << bit
    pkt.parse(bytes(data), expect)


def test_v2_oversized_is_refused_before_parsing():
    with pytest.raises(PacketError, match="exceeds"):
        pkt.parse(v2_packet(blob=bytes(200_000)), EXPECT)


def test_v2_pack_refuses_what_it_cannot_write():
    for p in [pkt.Packet("mshp", 2, FP8, [], [b"a"]),  # version 2 needs the full fingerprint
              pkt.Packet("mshp", 2, FP32, [], [b"a", b"b"]),  # one stream
              pkt.Packet("mshp", 3, FP32, [], [b"a"]),  # no such coder
              pkt.Packet("fp", 2, FP32, [], [b"a"], flags=1),  # integer hyper flag on FP
              pkt.Packet("mshp", 2, FP32, [], [b"a"], version=7)]:
        with pytest.raises(ValueError):
            pkt.pack(p)
    with pytest.raises(ValueError):
        pkt.Expect(family="fp", fingerprint=FP8, shapes=SHAPES, max_bytes=10)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=60), st.integers(0, 10_000))
def test_v2_mutated_packets_with_fixed_crc(junk, pos):
    """Even a version-2 packet whose CRC was recomputed after tampering parses or fails cleanly, and what
    parses has a frame the bundle allows (the stream is the coders' to refuse)."""
    data = bytearray(v2_packet()[:-4])
    pos %= len(data)
    data[pos:pos + len(junk)] = junk
    try:
        p = pkt.parse(_recrc2(bytes(data)), EXPECT)
    except PacketError:
        return
    assert p.family == "mshp" and p.coder_id in (1, 2) and p.flags in (0, 1) and p.version == 2
    assert p.payload_bytes == len(data) - 5


# ---------------------------------------------------------------------------------------------
# version 1: still parsed as before
# ---------------------------------------------------------------------------------------------


def test_roundtrip():
    p = pkt.parse(good_packet(), EXPECT)
    assert p.version == 1 and p.family == "mshp" and p.coder_id == 1 and p.idx_crc == 77
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


def test_wrong_version():
    data = bytearray(good_packet())
    data[4] = 2
    with pytest.raises(VersionError):
        pkt.parse(_recrc(bytes(data[:-4])), EXPECT)


def test_wrong_bundle():
    data = pkt.pack(pkt.Packet("mshp", 1, b"\x99" * 8, SHAPES, [b"a", b"b"], version=1))
    with pytest.raises(WrongBundleError):
        pkt.parse(data, EXPECT)


def test_wrong_shape_family_and_section_count():
    for p in [
        pkt.Packet("mshp", 1, FP8, [(8, 4, 4), (12, 15, 16)], [b"a", b"b"], version=1),
        pkt.Packet("fp", 1, FP8, [(12, 15, 15)], [b"a"], version=1),
        pkt.Packet("mshp", 1, FP8, [(8, 4, 4)], [b"a"], version=1),
        pkt.Packet("mshp", 9, FP8, SHAPES, [b"a", b"b"], version=1),
    ]:
        with pytest.raises(PacketError):
            pkt.parse(pkt.pack(p), EXPECT)


def test_oversized_is_refused_before_parsing():
    big = pkt.pack(pkt.Packet("mshp", 1, FP8, SHAPES, [b"a" * 200_000, b"b"], version=1))
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
    for expect in (EXPECT, EXPECT_FP):
        with contextlib.suppress(PacketError):
            pkt.parse(data, expect)


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
