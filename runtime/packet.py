"""The versioned packet format, and a parser that treats its input as hostile.

Version 2 (what the edge writes; little-endian)::

    offset size  field
    0      1     tag: bits 4-7 format version (2); bit 3 family (0 FP, 1 MSHP); bits 1-2 coder id
                 (1 constriction, 2 numba rANS; 0 and 3 invalid); bit 0 scale indexes from the
                 integer hyper path (MSHP only)
    1      1     fingerprint tag: the first byte of the bundle fingerprint
    2      3     MSHP only: the low 24 bits of the CRC32 of the scale indexes
    …            one entropy-coded stream (MSHP: z then y; FP: y) — its length is the rest
    end−4  4     CRC32 of the bundle's full 32-byte fingerprint followed by every byte before it

No shapes, counts or lengths: the bundle fixes them. Version 1 (``SPBT`` magic; see
:func:`_parse_v1`) is still read: its first byte (``0x53``) is not a valid version-2 tag.

The parser checks, in this order and before anything is allocated or decoded: the size bound,
the tag's version (0 and 1 are no packet's: a version-1 packet starts with ``S``), the fingerprint
tag (``WrongBundleError``), family, coder and flags against the bundle, the minimum length, the CRC;
anything off is a ``PacketError`` subclass naming what was wrong.
The decoders then treat the stream as hostile, and the server checks the scale indexes it
recomputes against the packet's (``IndexMismatchError``).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from splitbits.runtime.errors import PacketError, VersionError, WrongBundleError

VERSION = 2  # what pack() writes by default, and the edge sends
VERSIONS = (1, 2)  # what parse() reads
FAMILIES = {"fp": 1, "mshp": 2}
FAMILY_NAMES = {v: k for k, v in FAMILIES.items()}
FLAG_INT_HYPER = 1
KNOWN_FLAGS = FLAG_INT_HYPER
FINGERPRINT_BYTES = 32
#: the bits of the scale indexes' CRC32 a packet carries, per version
IDX_CHECK_MASK = {1: 0xFFFFFFFF, 2: 0xFFFFFF}

# -- version 2 ---------------------------------------------------------------------------------
_TAG_MSHP = 0x08
_CODER_SHIFT = 1
_V2_HEAD = {"fp": 2, "mshp": 5}  # tag, fingerprint tag[, idx check]
_CRC = struct.Struct("<I")

# -- version 1 ---------------------------------------------------------------------------------
MAGIC = b"SPBT"
MAX_SECTIONS = 4
_HEAD = struct.Struct("<4sBBBB8sIB")
_SECTION = struct.Struct("<HHHI")
MIN_PACKET = _HEAD.size + _CRC.size  # of version 1


@dataclass
class Packet:
    """A packet's fields. ``fingerprint``: the bundle's 32 bytes (version 2; the CRC covers them) or
    the first 8 (version 1); ``shapes``: version 1's section shapes (version 2: the bundle's, filled in
    by :func:`parse`); ``blobs``: version 2's one stream, or version 1's sections; ``idx_crc``: the
    scale indexes' CRC32, of which version 2 carries the low 24 bits."""

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
    """What a packet for a given bundle must look like (``fingerprint``: the bundle's 32 bytes)."""

    family: str
    fingerprint: bytes
    shapes: list[tuple[int, int, int]]
    max_bytes: int
    coder_ids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if len(self.fingerprint) != FINGERPRINT_BYTES:
            raise ValueError(f"a bundle fingerprint is {FINGERPRINT_BYTES} bytes")


def pack(p: Packet) -> bytes:
    """The bytes of ``p`` in its format version (the edge writes version 2)."""
    if p.version == 2:
        return _pack_v2(p)
    if p.version == 1:
        return _pack_v1(p)
    raise ValueError(f"no packet format version {p.version}")


def _tag(family: str, coder_id: int, flags: int) -> int:
    if family not in FAMILIES or coder_id not in (1, 2):
        raise ValueError(f"no version-2 tag for family {family!r}, coder id {coder_id}")
    if flags & ~KNOWN_FLAGS or (flags and family != "mshp"):
        raise ValueError(f"flags {flags:#x} are not valid for a {family} packet")
    return (2 << 4) | (_TAG_MSHP if family == "mshp" else 0) | (coder_id << _CODER_SHIFT) | flags


def _pack_v2(p: Packet) -> bytes:
    if len(p.fingerprint) != FINGERPRINT_BYTES:
        raise ValueError(f"a version-2 packet needs the bundle's {FINGERPRINT_BYTES}-byte fingerprint")
    if len(p.blobs) != 1:
        raise ValueError("a version-2 packet holds one stream")
    head = bytes((_tag(p.family, p.coder_id, p.flags), p.fingerprint[0]))
    if p.family == "mshp":
        head += (p.idx_crc & IDX_CHECK_MASK[2]).to_bytes(3, "little")
    blob = p.blobs[0]
    crc = zlib.crc32(blob, zlib.crc32(head, zlib.crc32(p.fingerprint)))
    return b"".join((head, blob, _CRC.pack(crc)))  # one copy of the stream


def parse(data: bytes | bytearray | memoryview, expect: Expect) -> Packet:
    """Validate and split a packet (either version); blobs are zero-copy views into ``data``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PacketError(f"a packet is bytes, got {type(data).__name__}")
    mv = memoryview(data).cast("B")
    n = len(mv)
    if n > expect.max_bytes:
        raise PacketError(f"packet of {n} bytes exceeds the bound of {expect.max_bytes} bytes")
    if n and mv[0] == MAGIC[0]:
        return _parse_v1(mv, expect)
    return _parse_v2(mv, expect)


def _parse_v2(mv: memoryview, expect: Expect) -> Packet:
    n = len(mv)
    if n < 2:
        raise PacketError(f"truncated packet: {n} bytes")
    tag, fp_tag = mv[0], mv[1]
    if tag >> 4 < 2:  # no version 0, and version 1 starts with "S"
        raise PacketError(f"not a splitbits packet (tag {tag:#04x})")
    if tag >> 4 != 2:
        raise VersionError(f"packet format version {tag >> 4}; this runtime reads versions 1 and 2")
    if fp_tag != expect.fingerprint[0]:
        raise WrongBundleError(f"packet made for bundle {fp_tag:02x}…, this server runs {expect.fingerprint.hex()}")
    fam = "mshp" if tag & _TAG_MSHP else "fp"
    coder_id, flags = (tag >> _CODER_SHIFT) & 3, tag & 1
    if fam != expect.family:
        raise PacketError(f"packet family {fam} does not match the bundle's {expect.family}")
    if coder_id == 0 or (expect.coder_ids and coder_id not in expect.coder_ids):
        raise PacketError(f"packet coder id {coder_id} is not available here")
    if flags and fam != "mshp":
        raise PacketError(f"packet flags {flags:#04x} are not valid for a {fam} packet")
    head = _V2_HEAD[fam]
    if n < head + _CRC.size:
        raise PacketError(f"truncated packet: {n} bytes, the frame alone is {head + _CRC.size}")
    (crc,) = _CRC.unpack_from(mv, n - _CRC.size)
    if zlib.crc32(mv[: n - _CRC.size], zlib.crc32(expect.fingerprint)) != crc:
        raise PacketError("packet checksum mismatch (corrupted or truncated in transit, or made for another bundle)")
    idx_crc = int.from_bytes(mv[2:5], "little") if fam == "mshp" else 0
    return Packet(fam, coder_id, expect.fingerprint, list(expect.shapes), [mv[head: n - _CRC.size]], idx_crc,
                  flags, 2)


# -- version 1: read as before; pack kept for tests and old-format fixtures ------------------------


def _pack_v1(p: Packet) -> bytes:
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


def _parse_v1(mv: memoryview, expect: Expect) -> Packet:
    """Version 1: ``SPBT``, version, family, coder id, flags (u8 each), the fingerprint's first 8
    bytes, the CRC32 of the scale indexes (u32), the section count (u8), per section C, H, W (u16)
    and the blob length (u32), the blobs, and the CRC32 of every byte before it."""
    n = len(mv)
    if n < MIN_PACKET:
        raise PacketError(f"truncated packet: {n} bytes, a header alone is {MIN_PACKET}")
    magic, version, family, coder_id, flags, fingerprint, idx_crc, nsec = _HEAD.unpack_from(mv, 0)
    if magic != MAGIC:
        raise PacketError("not a splitbits packet (bad magic)")
    if version != 1:
        raise VersionError(f"packet format version {version} in a version-1 frame; this runtime reads versions 1 and 2")
    (crc,) = _CRC.unpack_from(mv, n - _CRC.size)
    if zlib.crc32(mv[: n - _CRC.size]) & 0xFFFFFFFF != crc:
        raise PacketError("packet checksum mismatch (corrupted or truncated in transit)")
    if fingerprint != expect.fingerprint[:8]:
        raise WrongBundleError(
            f"packet made for bundle {fingerprint.hex()}, this server runs {expect.fingerprint[:8].hex()}"
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
