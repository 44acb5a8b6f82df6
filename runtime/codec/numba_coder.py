"""Interleaved rANS in Numba over the exported integer CDF tables — the default coder.

Why hand-written rather than a library: the coder has to run on a Jetson (aarch64, where
constriction has no wheel), use CompressAI's integer tables exactly as exported (so the bytes
sit within a few bytes of −Σlog₂p under *those* tables), code a whole latent — or a batch of
latents — per call with no per-symbol Python, and treat the decoder's input as hostile. rANS is
~100 lines of integer code; in Numba it runs at C speed with its compiled code cached on disk.

Coder (Duda's rANS, in the style of Giesen's ``rans64``): state ``x`` in ``[L, L·2³²)`` with
``L = 2²³``, renormalised by one 32-bit word at most per symbol. (A 32-bit state with 16-bit words loses
~0.4 % to the ideal at 16-bit table precision, since ``x/freq`` gets small; here ``x/freq ≥ 2⁷``
and the loss is not measurable, while the smaller ``L`` and a final state written in as few bytes
as it needs keep the fixed cost of a section to ~5 bytes.) Optionally ``K = 2**lanes_log2`` states
are interleaved (symbol ``i`` uses state ``i mod K``) over one shared word stream, which gives the
CPU independent dependency chains; measured on this project's latents it buys ~+20 % speed for ~6
bytes per extra state, so the default is one state per packet section (``LANE_POLICY``). Decoding
looks the symbol up in a per-table bucket table (the symbol at every ``2**(precision−12)``-th
slot, uint16, 8 KiB per table so that the tables of a trained model's many scales stay in cache;
a full ``2**precision`` slot table is 16× larger and made decoding cache-miss bound), then steps
over the few CDF boundaries inside the bucket; never a scan of the CDF.

Blob layout (all little-endian)::

    u8      bits 0-2: lanes_log2 (0..5); bits 3-5: nb − 3; bits 6-7: 0
    nb B    final state of lane 0 (nb = 3..7 bytes, as few as it needs), then 7 bytes for each
            further lane
    u32 …   the renormalisation words, in decoding order (their count is implicit: the decoder
            consumes exactly the words it needs)
    …       escapes: zigzag LEB128 of each escaped value (int32, ≤ 5 bytes), in symbol order

Escapes: a value outside table ``t``'s support codes table ``t``'s escape symbol and its exact
value in the escape stream, so any int32 survives (``tables.py``).

Hostile input: every read is bounds-checked explicitly (Numba does no bounds checking); a read
past the end of the blob yields a zero word and leaves the blob invalid; the
decoder runs exactly ``n`` iterations (``n`` comes from the bundle's shapes, never from the
blob), then requires the states back at their initial value ``L`` (rANS's built-in integrity
check), the escape stream complete and no trailing bytes. Anything else is a ``PacketError``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit

from splitbits.runtime.codec.base import EntropyCoder
from splitbits.runtime.codec.tables import CdfTables
from splitbits.runtime.errors import PacketError

RANS_L_BITS = 23
RANS_L = 1 << RANS_L_BITS  # lower end of the state interval [L, L << 32)
STATE_BYTES = (RANS_L_BITS + 32 + 7) // 8  # bytes of a full final state
MAX_LANES_LOG2 = 5
BUCKET_BITS = 12  # decoder lookup: 2**12 buckets per table
# Interleaving by latent size, as (at least this many symbols, lanes_log2). Each extra state costs
# ~6 bytes and one state already beats the speed targets (`splitbits bench codec --lanes 0 1 2`),
# so it is one state everywhere; the decoder reads any 0..MAX_LANES_LOG2.
LANE_POLICY: tuple[tuple[int, int], ...] = ((0, 0),)

_JIT = {"cache": True, "nogil": True, "error_model": "numpy", "boundscheck": False}

# decoder error codes -> messages
_ERRORS = {
    1: "bad header byte",
    2: "blob shorter than its final states",
    3: "invalid initial rANS state",
    4: "table index out of range",
    5: "corrupted rANS stream (overrun, or the final state is wrong)",
    6: "escape stream truncated or over-long varint",
    7: "trailing bytes after the escape stream",
    8: "escape value outside int32",
}


_ONE_LANES = [np.full(1, k, np.int64) for k in range(MAX_LANES_LOG2 + 1)]  # read-only by the kernel


def lanes_log2_for(n: int) -> int:
    """Interleaving (log2 of the number of rANS states) for a latent of ``n`` symbols."""
    k = 0
    for threshold, lanes in LANE_POLICY:
        if n >= threshold:
            k = lanes
    return k


# ---------------------------------------------------------------------------------------------
# Kernels. State arithmetic is uint64 (states < 2**63; products f·(x >> prec) < 2**63), with every
# literal typed (Numba turns uint64 ⊕ int64 into float64). Every index into a table is either
# validated or bounded by construction (slot < 2**precision, v ≤ length - 2).
# ---------------------------------------------------------------------------------------------

_U8, _U16, _U24, _U32 = np.uint64(8), np.uint64(16), np.uint64(24), np.uint64(32)
_M16, _M32 = np.uint64(0xFFFF), np.uint64(0xFFFFFFFF)
_L = np.uint64(RANS_L)


@njit(**_JIT)
def _encode_one(sym, idx, start, n, k, fs, length, offset, prec, wbuf, ebuf, x):  # pragma: no cover
    """rANS-encode ``sym[start:start+n]`` with ``2**k`` states; words go to ``wbuf[p:n]`` (backwards).

    Returns ``(p, n_esc, ok)``; final states in ``x[:2**k]``; escaped values in ``ebuf[:n_esc]``
    (last symbol first).
    """
    lanes = np.int64(1) << k
    p = n
    n_esc = 0
    xs = np.uint64(RANS_L_BITS + 32 - prec)  # x_max = ((L >> prec) << 32) · freq
    pr = np.uint64(prec)
    num_tables = length.size
    if k == 0:  # one state, kept in a register
        x0 = _L
        for i in range(n - 1, -1, -1):
            t = np.int64(idx[start + i])
            if t < 0 or t >= num_tables:
                return p, n_esc, False
            s = np.int64(sym[start + i])
            v = s - offset[t]
            esc = np.int64(length[t]) - 2
            if v < 0 or v >= esc:  # escape: code the escape symbol, keep the value aside
                ebuf[n_esc] = s
                n_esc += 1
                v = esc
            e = np.uint64(fs[t, v])
            f = e >> _U16
            wbuf[p - 1] = x0 & _M32  # store unconditionally, keep it only when renormalising
            if x0 >= (f << xs):
                p -= 1
                x0 >>= _U32
            q = x0 // f
            x0 = (q << pr) + (x0 - q * f) + (e & _M16)
        x[0] = x0
    else:  # interleaved states: symbol i uses state i mod 2**k
        for j in range(lanes):
            x[j] = _L
        for i in range(n - 1, -1, -1):
            t = np.int64(idx[start + i])
            if t < 0 or t >= num_tables:
                return p, n_esc, False
            s = np.int64(sym[start + i])
            v = s - offset[t]
            esc = np.int64(length[t]) - 2
            if v < 0 or v >= esc:
                ebuf[n_esc] = s
                n_esc += 1
                v = esc
            e = np.uint64(fs[t, v])
            f = e >> _U16
            j = i & (lanes - 1)
            xj = x[j]
            wbuf[p - 1] = xj & _M32
            if xj >= (f << xs):
                p -= 1
                xj >>= _U32
            q = xj // f
            x[j] = (q << pr) + (xj - q * f) + (e & _M16)
    return p, n_esc, True


@njit(**_JIT)
def _put_varint(out, o, u):  # pragma: no cover - jitted
    while True:
        byte = u & 0x7F
        u >>= 7
        if u:
            out[o] = byte | 0x80
            o += 1
        else:
            out[o] = byte
            return o + 1


@njit(**_JIT)
def _encode_kernel(sym, idx, offs, lanes_log2, fs, length, offset, prec):  # pragma: no cover - jitted
    """Encode latents ``sym[offs[b]:offs[b+1]]``; returns (bytes, blob offsets, 1 + bad latent or 0)."""
    nb = offs.size - 1
    total = np.int64(0)
    nmax = np.int64(0)
    for b in range(nb):
        n = offs[b + 1] - offs[b]
        total += 1 + STATE_BYTES * (1 << lanes_log2[b]) + 4 * n + 5 * n
        nmax = max(nmax, n)
    out = np.empty(total, np.uint8)
    out_offs = np.zeros(nb + 1, np.int64)
    wbuf = np.empty(max(nmax, 1), np.uint32)
    ebuf = np.empty(max(nmax, 1), np.int32)
    x = np.empty(1 << MAX_LANES_LOG2, np.uint64)
    o = np.int64(0)
    for b in range(nb):
        n = offs[b + 1] - offs[b]
        k = lanes_log2[b]
        p, n_esc, ok = _encode_one(sym, idx, offs[b], n, k, fs, length, offset, prec, wbuf, ebuf, x)
        if not ok:
            return out, out_offs, np.int64(b + 1)
        nb0 = 3
        while nb0 < STATE_BYTES and (x[0] >> np.uint64(8 * nb0)) != 0:
            nb0 += 1
        out[o] = k | ((nb0 - 3) << 3)
        o += 1
        for j in range(np.int64(1) << k):
            for q in range(nb0 if j == 0 else STATE_BYTES):
                out[o] = (x[j] >> np.uint64(8 * q)) & np.uint64(0xFF)
                o += 1
        for w in range(p, n):
            word = np.int64(wbuf[w])
            out[o] = word & 0xFF
            out[o + 1] = (word >> 8) & 0xFF
            out[o + 2] = (word >> 16) & 0xFF
            out[o + 3] = word >> 24
            o += 4
        for q in range(n_esc - 1, -1, -1):  # collected last-first: write them in symbol order
            s = np.int64(ebuf[q])
            o = _put_varint(out, o, ((s << 1) ^ (s >> 63)) & 0xFFFFFFFF)
        out_offs[b + 1] = o
    return out, out_offs, np.int64(0)


@njit(**_JIT)
def _read_u32(buf, a):  # pragma: no cover - jitted
    return (np.uint64(buf[a]) | (np.uint64(buf[a + 1]) << _U8) | (np.uint64(buf[a + 2]) << _U16)
            | (np.uint64(buf[a + 3]) << _U24))


@njit(**_JIT)
def _read_varint(buf, pos, end):  # pragma: no cover - jitted
    """(value, new pos, ok) of an unsigned LEB128 of at most 5 bytes within ``buf[pos:end]``."""
    u = np.int64(0)
    shift = 0
    for _ in range(5):
        if pos >= end:
            return u, pos, False
        byte = np.int64(buf[pos])
        pos += 1
        u |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return u, pos, True
    return u, pos, False


@njit(**_JIT)
def _read_word(buf, pos, end):  # pragma: no cover - jitted
    """The u32 at ``pos``, or 0 past ``end`` (a hostile stream; caught once decoding ends)."""
    if pos + 4 <= end:
        return _read_u32(buf, pos)
    return np.uint64(0)


@njit(**_JIT)
def _decode_one(buf, pos, end, idx, start, n, k, fs, cdf, buckets, length, offset, prec, out, esc_pos, x):
    """rANS-decode ``n`` symbols from the words at ``buf[pos:end]``; returns (n_esc, end of words, error)."""
    lanes = np.int64(1) << k
    pr = np.uint64(prec)
    mask = np.uint64((1 << prec) - 1)
    bits = 0
    while (np.int64(1) << bits) < buckets.shape[1]:
        bits += 1
    bshift = np.uint64(prec - bits)
    num_tables = length.size
    wp = pos  # next word
    n_esc = 0
    if k == 0:
        x0 = x[0]
        for i in range(n):
            t = np.int64(idx[start + i])
            if t < 0 or t >= num_tables:
                return n_esc, wp, 4
            slot = x0 & mask
            v = np.int64(buckets[t, slot >> bshift])
            while cdf[t, v + 1] <= slot:  # at most a bucket's width of steps (valid tables)
                v += 1
            e = np.uint64(fs[t, v])
            x0 = (e >> _U16) * (x0 >> pr) + slot - (e & _M16)
            if x0 < _L:
                x0 = (x0 << _U32) | _read_word(buf, wp, end)
                wp += 4
            out[start + i] = v + offset[t]
            if v == length[t] - 2:
                esc_pos[n_esc] = start + i
                n_esc += 1
        x[0] = x0
    else:
        for i in range(n):
            t = np.int64(idx[start + i])
            if t < 0 or t >= num_tables:
                return n_esc, wp, 4
            j = i & (lanes - 1)
            xj = x[j]
            slot = xj & mask
            v = np.int64(buckets[t, slot >> bshift])
            while cdf[t, v + 1] <= slot:
                v += 1
            e = np.uint64(fs[t, v])
            xj = (e >> _U16) * (xj >> pr) + slot - (e & _M16)
            if xj < _L:
                xj = (xj << _U32) | _read_word(buf, wp, end)
                wp += 4
            x[j] = xj
            out[start + i] = v + offset[t]
            if v == length[t] - 2:
                esc_pos[n_esc] = start + i
                n_esc += 1
    if wp > end:
        return n_esc, wp, 5
    for j in range(lanes):
        if x[j] != _L:
            return n_esc, wp, 5
    return n_esc, wp, 0


@njit(**_JIT)
def _decode_kernel(buf, boffs, idx, offs, fs, cdf, buckets, length, offset, prec):  # pragma: no cover - jitted
    """Decode blobs ``buf[boffs[b]:boffs[b+1]]`` into ``offs[b+1]-offs[b]`` symbols each.

    Returns (symbols, error code per blob); a blob with an error leaves its symbols undefined.
    """
    nb = offs.size - 1
    out = np.empty(offs[nb], np.int32)
    errs = np.zeros(nb, np.int64)
    nmax = np.int64(1)
    for b in range(nb):
        nmax = max(nmax, offs[b + 1] - offs[b])
    esc_pos = np.empty(nmax, np.int64)
    x = np.empty(1 << MAX_LANES_LOG2, np.uint64)
    for b in range(nb):
        start = offs[b]
        n = offs[b + 1] - start
        pos = boffs[b]
        end = boffs[b + 1]
        # -- header and initial states
        if pos >= end:
            errs[b] = 1
            continue
        k = np.int64(buf[pos]) & 7
        nb0 = ((np.int64(buf[pos]) >> 3) & 7) + 3
        if k > MAX_LANES_LOG2 or nb0 > STATE_BYTES or buf[pos] >= 64:
            errs[b] = 1
            continue
        pos += 1
        lanes = np.int64(1) << k
        if nb0 + STATE_BYTES * (lanes - 1) > end - pos:
            errs[b] = 2
            continue
        bad = False
        for j in range(lanes):
            xj = np.uint64(0)
            for q in range(nb0 if j == 0 else STATE_BYTES):
                xj |= np.uint64(buf[pos]) << np.uint64(8 * q)
                pos += 1
            if xj < _L or xj >= (_L << _U32):
                bad = True
            x[j] = xj
        if bad:
            errs[b] = 3
            continue
        # -- symbols
        n_esc, pos, err = _decode_one(buf, pos, end, idx, start, n, k, fs, cdf, buckets, length, offset, prec,
                                      out, esc_pos, x)
        if err:
            errs[b] = err
            continue
        # -- escapes
        for q in range(n_esc):
            u, pos, ok = _read_varint(buf, pos, end)
            if not ok:
                errs[b] = 6
                break
            if u > 0xFFFFFFFF:
                errs[b] = 8
                break
            out[esc_pos[q]] = (u >> 1) ^ -(u & 1)
        if errs[b] == 0 and pos != end:
            errs[b] = 7
    return out, errs


@njit(**_JIT)
def _bucket_table(cdf, length, prec, bits):  # pragma: no cover - jitted
    """``buckets[t, j]`` = the symbol of table ``t`` whose interval holds slot ``j << (prec − bits)``."""
    num_tables = length.size
    shift = prec - bits
    buckets = np.zeros((num_tables, np.int64(1) << bits), np.uint16)
    for t in range(num_tables):
        v = 0
        for j in range(np.int64(1) << bits):
            s = j << shift
            while cdf[t, v + 1] <= s:
                v += 1
            buckets[t, j] = v
    return buckets


# ---------------------------------------------------------------------------------------------
# Python side: prepared tables (cached per CdfTables object), array normalisation, errors.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    fs: np.ndarray  # uint32 [T, Lmax-1]: start | freq << 16
    cdf: np.ndarray  # int32 [T, Lmax] (validated)
    buckets: np.ndarray  # uint16 [T, 2**bits]
    length: np.ndarray  # int32 [T]
    offset: np.ndarray  # int32 [T]
    prec: np.int64


_prepared: dict[int, tuple[weakref.ref, _Prepared]] = {}


def prepare(tables: CdfTables) -> _Prepared:
    """Encoder/decoder tables for ``tables`` (built once per tables object, ~ms)."""
    key = id(tables)
    hit = _prepared.get(key)
    if hit is not None and hit[0]() is tables:
        return hit[1]
    cdf = tables.cdf.astype(np.int64)
    if tables.length.max() - 1 > np.iinfo(np.uint16).max:
        raise ValueError("tables with more than 65535 symbols are not supported by the numba coder")
    freq = np.diff(cdf, axis=1)
    fs = np.ascontiguousarray(((cdf[:, :-1] & 0xFFFF) | (np.clip(freq, 0, 0xFFFF) << 16)).astype(np.uint32))
    cdf32 = np.ascontiguousarray(tables.cdf, dtype=np.int32)
    bits = min(BUCKET_BITS, tables.precision)
    buckets = _bucket_table(cdf32, tables.length, np.int64(tables.precision), np.int64(bits))
    prep = _Prepared(fs, cdf32, buckets, tables.length, tables.offset, np.int64(tables.precision))
    _prepared[key] = (weakref.ref(tables, lambda _r, k=key: _prepared.pop(k, None)), prep)
    return prep


def _as_int32(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.int32:
        if a.dtype.kind not in "iu":
            raise ValueError(f"{what} must be integers, got {a.dtype}")
        if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{what} outside int32")
    return np.ascontiguousarray(a.reshape(-1), dtype=np.int32)


def _concat(arrays: Sequence[np.ndarray], what: str) -> tuple[np.ndarray, np.ndarray]:
    """The arrays flattened back to back as one int32 array, and their offsets (one C call each)."""
    sizes = np.fromiter((np.size(a) for a in arrays), np.int64, len(arrays))
    offs = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum(sizes, out=offs[1:])
    if len(arrays) == 1:
        return _as_int32(arrays[0], what), offs
    return _as_int32(np.concatenate(arrays, axis=None), what), offs


def _readonly_bytes(blobs: Sequence[bytes | memoryview]) -> np.ndarray:
    """The blobs back to back as one read-only uint8 array (one array type for the kernel)."""
    buf = np.frombuffer(blobs[0] if len(blobs) == 1 else b"".join(blobs), dtype=np.uint8)
    if buf.flags.writeable:
        buf = buf.view()
        buf.setflags(write=False)
    return buf


class NumbaCoder(EntropyCoder):
    """Interleaved rANS (module docstring); ``lanes_log2=None`` picks the interleaving by size."""

    coder_id = 2
    name = "numba"

    def __init__(self, lanes_log2: int | None = None) -> None:
        if lanes_log2 is not None and not 0 <= lanes_log2 <= MAX_LANES_LOG2:
            raise ValueError(f"lanes_log2 must lie in 0..{MAX_LANES_LOG2}")
        self.lanes_log2 = lanes_log2

    def _encode(self, sym: np.ndarray, idx: np.ndarray, offs: np.ndarray, tables: CdfTables) -> list[bytes]:
        p = prepare(tables)
        count = offs.size - 1
        if count == 1:  # the common call: no per-call array building
            k = self.lanes_log2 if self.lanes_log2 is not None else lanes_log2_for(int(offs[1]))
            lanes = _ONE_LANES[k]
        elif self.lanes_log2 is not None:
            lanes = np.full(count, self.lanes_log2, np.int64)
        else:
            lanes = np.array([lanes_log2_for(int(n)) for n in np.diff(offs)], np.int64)
        out, out_offs, err = _encode_kernel(sym, idx, offs, lanes, p.fs, p.length, p.offset, p.prec)
        if err:
            raise ValueError(f"table index outside 0..{tables.num_tables - 1}")
        if count == 1:
            return [out[: out_offs[1]].tobytes()]
        o = out_offs.tolist()
        return [out[o[b]:o[b + 1]].tobytes() for b in range(count)]

    def _decode(self, blobs: Sequence[bytes | memoryview], idx: np.ndarray, offs: np.ndarray,
                tables: CdfTables) -> np.ndarray:
        p = prepare(tables)
        boffs = np.zeros(len(blobs) + 1, np.int64)
        np.cumsum(np.fromiter((len(b) for b in blobs), np.int64, len(blobs)), out=boffs[1:])
        out, errs = _decode_kernel(_readonly_bytes(blobs), boffs, idx, offs, p.fs, p.cdf, p.buckets, p.length,
                                   p.offset, p.prec)
        bad = np.flatnonzero(errs)
        if bad.size:
            code = int(errs[bad[0]])
            if code == 4:
                raise ValueError(f"table index outside 0..{tables.num_tables - 1}")
            where = f" {int(bad[0])}" if len(blobs) > 1 else ""
            raise PacketError(f"numba rANS blob{where}: {_ERRORS.get(code, code)}")
        return out

    # -- batch API: one kernel call for the whole batch --------------------------------------------
    def encode_batch(self, symbols: Sequence[np.ndarray], index: Sequence[np.ndarray],
                     tables: CdfTables) -> list[bytes]:
        if len(symbols) != len(index):
            raise ValueError("symbols and index lists differ in length")
        if not len(symbols):
            return []
        sym, offs = _concat(symbols, "symbols")
        idx, ioffs = _concat(index, "index")
        if not np.array_equal(offs, ioffs):
            raise ValueError("symbols and index differ in size")
        return self._encode(sym, idx, offs, tables)

    def decode_batch(self, blobs: Sequence[bytes | memoryview], index: Sequence[np.ndarray],
                     tables: CdfTables) -> list[np.ndarray]:
        if len(blobs) != len(index):
            raise ValueError("blobs and index lists differ in length")
        if not len(blobs):
            return []
        idx, offs = _concat(index, "index")
        out = self._decode(blobs, idx, offs, tables)
        o = offs.tolist()
        return [out[o[b]:o[b + 1]] for b in range(len(blobs))]

    # -- single latent ----------------------------------------------------------------------------
    def encode(self, symbols: np.ndarray, index: np.ndarray, tables: CdfTables) -> bytes:
        sym, idx = _as_int32(symbols, "symbols"), _as_int32(index, "index")
        if sym.size != idx.size:
            raise ValueError("symbols and index differ in size")
        return self._encode(sym, idx, np.array([0, sym.size], np.int64), tables)[0]

    def decode(self, blob: bytes | memoryview, index: np.ndarray, tables: CdfTables) -> np.ndarray:
        idx = _as_int32(index, "index")
        return self._decode([blob], idx, np.array([0, idx.size], np.int64), tables)

    @staticmethod
    def cache_info() -> dict[str, object]:
        """Where the compiled kernels are cached on disk, and how many came from there (hits) or were
        compiled in this process (misses)."""
        kernels = (_encode_kernel, _decode_kernel, _bucket_table)
        return {"dir": kernels[0].stats.cache_path,
                "hits": sum(sum(k.stats.cache_hits.values()) for k in kernels),
                "misses": sum(sum(k.stats.cache_misses.values()) for k in kernels)}

    def warmup(self) -> None:
        """Load (or compile, then cache on disk) every kernel with the types used in production."""
        cdf = np.array([[0, 30000, 65535, 65536, 65536], [0, 1, 2, 3, 65536]], np.int32)
        tables = CdfTables.create(cdf, np.array([4, 5]), np.array([-1, 0]))
        rng = np.random.default_rng(0)
        sym = [rng.integers(-3, 4, n).astype(np.int32) for n in (5, 40)]
        idx = [rng.integers(0, 2, s.size).astype(np.int32) for s in sym]
        blobs = self.encode_batch(sym, idx, tables)
        self.decode_batch(blobs, idx, tables)
        self.decode(memoryview(bytearray(blobs[0])), idx[0], tables)
