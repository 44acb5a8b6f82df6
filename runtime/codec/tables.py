"""Quantised CDF tables (CompressAI layout) and the escape code shared by all coders.

A table set holds ``T`` CDFs at ``precision`` bits: ``cdf[t, :length[t]]`` is non-decreasing from 0 to
``2**precision``, so table ``t`` has ``length[t] - 1`` symbols. Symbols ``0 .. length[t] - 3`` are the
values ``offset[t] .. offset[t] + length[t] - 3``; the last one (``length[t] - 2``) is the *escape*:
a value outside the table's support codes the escape symbol with the table and its exact value in
the escape stream (zigzag LEB128), so every int32 survives unchanged. This is CompressAI's
``_quantized_cdf`` / ``_cdf_length`` / ``_offset`` layout, so its ``update()`` tables are used as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitbits.runtime.errors import BundleError, PacketError

MAX_VARINT_BYTES = 10  # zigzag int64


@dataclass(frozen=True)
class CdfTables:
    """A validated set of quantised CDFs (see module docstring)."""

    cdf: np.ndarray  # int32 [T, Lmax]
    length: np.ndarray  # int32 [T]
    offset: np.ndarray  # int32 [T]
    precision: int = 16

    @classmethod
    def create(cls, cdf: np.ndarray, length: np.ndarray, offset: np.ndarray, precision: int = 16,
               name: str = "tables") -> CdfTables:
        """Check shapes, dtypes and monotonicity; a bad table is a ``BundleError``, never a crash later."""
        cdf = np.ascontiguousarray(cdf, dtype=np.int32)
        length = np.ascontiguousarray(np.asarray(length).reshape(-1), dtype=np.int32)
        offset = np.ascontiguousarray(np.asarray(offset).reshape(-1), dtype=np.int32)
        if cdf.ndim != 2 or cdf.shape[0] == 0:
            raise BundleError(f"{name}: cdf must be a non-empty 2-D table, got shape {cdf.shape}")
        t, lmax = cdf.shape
        if length.shape != (t,) or offset.shape != (t,):
            raise BundleError(f"{name}: length/offset must have {t} entries")
        if not 1 <= precision <= 16:
            raise BundleError(f"{name}: precision {precision} outside 1..16")
        if (length < 3).any() or (length > lmax).any():
            raise BundleError(f"{name}: cdf lengths must lie in 3..{lmax}")
        total = 1 << precision
        cols = np.arange(lmax)[None, :]
        valid = cols < length[:, None]
        if (cdf[:, 0] != 0).any() or (cdf[np.arange(t), length - 1] != total).any():
            raise BundleError(f"{name}: every cdf must start at 0 and end at 2**{precision}")
        steps = np.diff(cdf, axis=1)
        if (steps[valid[:, 1:]] <= 0).any():
            raise BundleError(f"{name}: cdfs must be strictly increasing (every symbol needs mass)")
        return cls(cdf, length, offset, int(precision))

    @property
    def num_tables(self) -> int:
        return int(self.cdf.shape[0])

    def pmf(self, t: int) -> np.ndarray:
        """Integer frequencies of table ``t`` (escape last), summing to ``2**precision``."""
        return np.diff(self.cdf[t, : self.length[t]]).astype(np.int64)

    def values(self, symbols: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map symbols to table values; returns ``(values, escaped)`` with escapes set to the escape value."""
        v = symbols.astype(np.int64) - self.offset[index]
        esc_value = (self.length[index] - 2).astype(np.int64)
        escaped = (v < 0) | (v >= esc_value)
        return np.where(escaped, esc_value, v), escaped

    def ideal_bits(self, symbols: np.ndarray, index: np.ndarray) -> float:
        """−Σlog₂p under these tables, escapes included at the cost of their escape bytes."""
        symbols = np.asarray(symbols).reshape(-1)
        index = np.asarray(index).reshape(-1)
        v, escaped = self.values(symbols, index)
        freq = self.cdf[index, v + 1].astype(np.int64) - self.cdf[index, v]
        bits = float(np.sum(self.precision - np.log2(freq)))
        if escaped.any():
            bits += 8.0 * len(zigzag_encode(symbols[escaped]))
        return bits


def check_index(index: np.ndarray, tables: CdfTables) -> np.ndarray:
    """Table indexes as a flat int32 array, all within range (a bad index would read out of bounds)."""
    index = np.ascontiguousarray(np.asarray(index).reshape(-1), dtype=np.int32)
    if index.size and (index.min() < 0 or index.max() >= tables.num_tables):
        raise ValueError(f"table index outside 0..{tables.num_tables - 1}")
    return index


# ---------------------------------------------------------------------------------------------
# Escape stream: zigzag + LEB128 varints, vectorised (an attacked latent may escape everywhere).
# ---------------------------------------------------------------------------------------------


def zigzag_encode(values: np.ndarray) -> bytes:
    """Signed integers (int64 range) → concatenated zigzag LEB128 varints."""
    v = np.asarray(values, dtype=np.int64).reshape(-1)
    if v.size == 0:
        return b""
    u = ((v << 1) ^ (v >> 63)).view(np.uint64)
    nbytes = np.ones(u.shape, dtype=np.int64)
    rest = u >> np.uint64(7)
    while rest.any():
        more = rest != 0
        nbytes += more
        rest = rest >> np.uint64(7)
    ends = np.cumsum(nbytes)
    starts = ends - nbytes
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    owner = np.repeat(np.arange(u.size), nbytes)
    k = np.arange(out.size) - starts[owner]
    groups = (u[owner] >> (7 * k).astype(np.uint64)) & np.uint64(0x7F)
    cont = (k < nbytes[owner] - 1).astype(np.uint64) << np.uint64(7)
    out[:] = (groups | cont).astype(np.uint8)
    return out.tobytes()


def zigzag_decode(data: bytes | memoryview, count: int) -> tuple[np.ndarray, int]:
    """Read exactly ``count`` varints from the start of ``data``; returns ``(int64 values, bytes used)``.

    Raises ``PacketError`` on a truncated stream or a varint longer than 10 bytes.
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64), 0
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf < 0x80)
    if ends.size < count:
        raise PacketError(f"escape stream holds {ends.size} values, {count} expected")
    ends = ends[:count]
    starts = np.concatenate(([0], ends[:-1] + 1))
    nbytes = ends - starts + 1
    if (nbytes > MAX_VARINT_BYTES).any():
        raise PacketError("escape stream has an over-long varint")
    used = int(ends[-1]) + 1
    owner = np.repeat(np.arange(count), nbytes)
    k = np.arange(used) - starts[owner]
    parts = (buf[:used].astype(np.uint64) & np.uint64(0x7F)) << (7 * k).astype(np.uint64)
    u = np.zeros(count, dtype=np.uint64)
    np.bitwise_or.at(u, owner, parts)
    v = (u >> np.uint64(1)).view(np.int64) ^ -(u & np.uint64(1)).view(np.int64)
    return v, used


def encode_varint(n: int) -> bytes:
    """Unsigned LEB128 of a non-negative int (used for small header fields inside coder blobs)."""
    if n < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def decode_varint(data: bytes | memoryview, pos: int = 0, max_bytes: int = 5) -> tuple[int, int]:
    """Unsigned LEB128 at ``pos``; returns ``(value, new_pos)``; bounded to ``max_bytes``."""
    n = shift = 0
    for i in range(max_bytes):
        if pos + i >= len(data):
            raise PacketError("truncated varint")
        b = data[pos + i]
        n |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return n, pos + i + 1
    raise PacketError("over-long varint")
