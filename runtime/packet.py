"""The versioned packet format, and a parser that treats its input as hostile.

Layout (little-endian)::

    offset size  field
    0      4     magic  b"SPBT"
    4      1     version (1)
    5      1     family (1 = fp, 2 = mshp)
    6      1     coder id (1 = constriction, 2 = numba rANS)
    7      1     flags (bit 0: scale indexes from the integer hyper path)
    8      8     bundle fingerprint (first 8 bytes of the bundle's sha256 fingerprint)
    16     4     CRC32 of the scale indexes (MSHP; 0 for FP)
    20     1     number of sections n (FP: 1 = y; MSHP: 2 = z, y)
    21     10·n  per section: C, H, W (uint16 each), blob length (uint32)
    ...          the n blobs, back to back
    end−4  4     CRC32 of every byte before it

Every count and length is checked against the bundle's expectations *before* anything is
allocated or decoded; anything off is a ``PacketError`` subclass naming what was wrong.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from splitbits.runtime.errors import PacketError, VersionError, WrongBundleError

MAGIC = b"SPBT"
VERSION = 1
FAMILIES = {"fp": 1, "mshp": 2}
FAMILY_NAMES = {v: k for k, v in FAMILIES.items()}
FLAG_INT_HYPER = 1
KNOWN_FLAGS = FLAG_INT_HYPER
MAX_SECTIONS = 4

_HEAD = struct.Struct("<4sBBBB8sIB")
_SECTION = struct.Struct("<HHHI")
_CRC = struct.Struct("<I")
MIN_PACKET = _HEAD.size + _CRC.size


@dataclass
class Packet:
    family: str
    coder_id: int
    fingerprint: bytes
    shapes: list[tuple[int, int, int]]
    blobs: list[bytes | memoryview]
    idx_crc: int = 0
    flags: int = 0
    version: int = VERSION

    @property
    def payload_bytes(self) -> int:
        """Entropy-coded bytes only (what compares with CompressAI's strings)."""
        return sum(len(b) for b in self.blobs)


@dataclass(frozen=True)
class Expect:
    """What a packet for a given bundle must look like."""

    family: str
    fingerprint: bytes
    shapes: list[tuple[int, int, int]]
    max_bytes: int
    coder_ids: frozenset[int] = field(default_factory=frozenset)


def pack(p: Packet) -> bytes:
    if len(p.shapes) != len(p.blobs) or not 0 < len(p.shapes) <= MAX_SECTIONS:
        raise ValueError("a packet needs 1..4 sections, one shape per blob")
    if len(p.fingerprint) != 8:
        raise ValueError("fingerprint must be 8 bytes")
    parts = [_HEAD.pack(MAGIC, p.version, FAMILIES[p.family], p.coder_id, p.flags, p.fingerprint,
                        p.idx_crc & 0xFFFFFFFF, len(p.shapes))]
    for shape, blob in zip(p.shapes, p.blobs):
        if any(not 0 < d < 65536 for d in shape):
            raise ValueError(f"section shape {shape} does not fit uint16")
        parts.append(_SECTION.pack(*shape, len(blob)))
    parts.extend(bytes(b) for b in p.blobs)
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body) & 0xFFFFFFFF)


def parse(data: bytes | bytearray | memoryview, expect: Expect) -> Packet:
    """Validate and split a packet; blobs are zero-copy views into ``data``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PacketError(f"a packet is bytes, got {type(data).__name__}")
    mv = memoryview(data).cast("B")
    n = len(mv)
    if n > expect.max_bytes:
        raise PacketError(f"packet of {n} bytes exceeds the bound of {expect.max_bytes} bytes")
    if n < MIN_PACKET:
        raise PacketError(f"truncated packet: {n} bytes, a header alone is {MIN_PACKET}")
    magic, version, family, coder_id, flags, fingerprint, idx_crc, nsec = _HEAD.unpack_from(mv, 0)
    if magic != MAGIC:
        raise PacketError("not a splitbits packet (bad magic)")
    if version != VERSION:
        raise VersionError(f"packet format version {version}; this runtime reads version {VERSION}")
    (crc,) = _CRC.unpack_from(mv, n - _CRC.size)
    if zlib.crc32(mv[: n - _CRC.size]) & 0xFFFFFFFF != crc:
        raise PacketError("packet checksum mismatch (corrupted or truncated in transit)")
    if fingerprint != expect.fingerprint:
        raise WrongBundleError(
            f"packet made for bundle {fingerprint.hex()}, this server runs {expect.fingerprint.hex()}"
        )
    fam = FAMILY_NAMES.get(family)
    if fam != expect.family:
        raise PacketError(f"packet family {fam or family} does not match the bundle's {expect.family}")
    if expect.coder_ids and coder_id not in expect.coder_ids:
        raise PacketError(f"packet coder id {coder_id} is not available here")
    if flags & ~KNOWN_FLAGS or (flags & FLAG_INT_HYPER and fam != "mshp"):
        raise PacketError(f"packet flags {flags:#04x} are not valid for a {fam} packet")
    if nsec != len(expect.shapes):
        raise PacketError(f"packet has {nsec} sections, the bundle expects {len(expect.shapes)}")
    pos = _HEAD.size
    if pos + nsec * _SECTION.size + _CRC.size > n:
        raise PacketError("truncated packet: section table cut off")
    shapes, lengths = [], []
    for i in range(nsec):
        c, h, w, ln = _SECTION.unpack_from(mv, pos)
        pos += _SECTION.size
        if (c, h, w) != tuple(expect.shapes[i]):
            raise PacketError(f"section {i} has shape {(c, h, w)}, the bundle expects {tuple(expect.shapes[i])}")
        shapes.append((c, h, w))
        lengths.append(ln)
    if pos + sum(lengths) + _CRC.size != n:
        raise PacketError(
            f"section lengths ({sum(lengths)} bytes) disagree with the packet size ({n - pos - _CRC.size} bytes)"
        )
    blobs = []
    for ln in lengths:
        blobs.append(mv[pos: pos + ln])
        pos += ln
    return Packet(fam, coder_id, bytes(fingerprint), shapes, blobs, idx_crc, flags, version)
