"""Interleaved rANS in Numba over the exported integer CDF tables — the default coder.

Why hand-written rather than a library: the coder has to run on a Jetson (aarch64, where
constriction has no wheel), use CompressAI's integer tables exactly as exported (so the bytes
sit within a few bytes of −Σlog₂p under *those* tables), code a whole packet — or a batch of
latents — per call with no per-symbol Python, and treat the decoder's input as hostile. rANS is
~100 lines of integer code; in Numba it runs at C speed with its compiled code cached on disk.

Coder (Duda's rANS, in the style of Giesen's ``rans64``): state ``x`` in ``[L, L·2³²)`` with
``L = 2²³``, renormalised by one 32-bit word at most per symbol. (A 32-bit state with 16-bit words loses
~0.4 % to the ideal at 16-bit table precision, since ``x/freq`` gets small; here ``x/freq ≥ 2⁷``
and the loss is not measurable, while the smaller ``L`` and a final state written in as few bytes
as it needs keep the fixed cost of a blob to ~5 bytes.) Optionally ``K = 2**lanes_log2`` states
are interleaved (symbol ``i`` uses state ``i mod K``) over one shared word stream, which gives the
CPU independent dependency chains; measured on this project's latents it buys ~+20 % speed for ~6
bytes per extra state, so the default is one state per blob (``LANE_POLICY``). Decoding
looks the symbol up in a per-table bucket table (the symbol at every ``2**(precision−12)``-th
slot, uint16, 8 KiB per table so that the tables of a trained model's many scales stay in cache;
a full ``2**precision`` slot table is 16× larger and made decoding cache-miss bound), then steps
over the few CDF boundaries inside the bucket; never a scan of the CDF.

Two blob layouts (all little-endian), written by one encoding kernel and read by one decoding loop
(``_decode_part``, under the section-batch and the stream entry points)::

    u8      bits 0-2: lanes_log2 (0..5); bits 3-5: nb − 3; bits 6-7: 0
    nb B    final state of lane 0 (nb = 3..7 bytes, as few as it needs), then 7 bytes for each
            further lane
    then, in a section blob (``encode``/``decode``; a version-1 packet's sections):
    u32 …   the renormalisation words, in decoding order (their count is implicit: the decoder
            consumes exactly the words it needs)
    …       escapes: zigzag LEB128 of each escaped value (int32, ≤ 5 bytes), in symbol order
    or, in a stream (``encode_stream``/``decode_stream``; a version-2 packet):
    …       escapes, as above, in symbol order
    u32 …   the renormalisation words, in decoding order *from the blob's end backwards*

A stream codes several parts (MSHP: z then y) with one set of states carried across them: the
encoder runs the parts in reverse, the decoder part by part; each part's escapes are read (forwards,
after the states) as soon as its symbols are decoded — z's values are exact before the caller
computes y's indexes from them — while the words are read from the end; the two cursors must meet
exactly. One stream per packet costs one header byte and one final state (~5 bytes) instead of one
per latent. The words sit at the end so that a cut or grown stream misaligns them and the final-state
check refuses it, as it refuses a changed word; escape values are raw (the packet's CRC guards them).

Escapes: a value outside table ``t``'s support codes table ``t``'s escape symbol and its exact
value in the escape bytes, so any int32 survives (``tables.py``).

Hostile input: every read is bounds-checked explicitly (Numba does no bounds checking); a word read
past its bound yields a zero word and leaves the blob invalid; the decoder runs exactly ``n``
iterations per part (``n`` comes from the bundle's shapes, never from the blob), then requires the
states back at their initial value ``L`` (rANS's built-in integrity check), every escape complete
and every byte consumed exactly once. Anything else is a ``PacketError``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit

from splitbits.runtime.codec.base import EntropyCoder, Part, StreamDecoder
from splitbits.runtime.codec.tables import CdfTables
from splitbits.runtime.errors import PacketError

RANS_L_BITS = 23
RANS_L = 1 << RANS_L_BITS  # lower end of the state interval [L, L << 32)
STATE_BYTES = (RANS_L_BITS + 32 + 7) // 8  # bytes of a full final state
MAX_LANES_LOG2 = 5
BUCKET_BITS = 12  # decoder lookup: 2**12 buckets per table
# Interleaving by blob size, as (at least this many symbols, lanes_log2). Each extra state costs
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
    9: "words and escapes do not meet (bytes left over, or read twice)",
    10: "a part requested after an error, or the stream finished before any part",
}


_ONE_LANES = [np.full(1, k, np.int64) for k in range(MAX_LANES_LOG2 + 1)]  # read-only by the kernel
_ONE_STREAM = np.array([0, 1], np.int64)
_TWO_PARTS = np.array([0, 2], np.int64)
_EMPTY = np.zeros(0, np.int32)  # no second symbol array


def lanes_log2_for(n: int) -> int:
    """Interleaving (log2 of the number of rANS states) for a blob of ``n`` symbols."""
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
def _encode_part(sym, idx, start, n, pos0, tbase, tcount, k, fs, length, offset, prec, wbuf, p, ebuf, n_esc,
                 x):  # pragma: no cover - jitted
    """rANS-encode ``sym[start:start+n]`` (last symbol first) with the ``2**k`` states ``x``, continuing a
    blob: words go to ``wbuf[:p]`` backwards, escaped values to ``ebuf[n_esc:]``. Symbol ``i`` uses table
    ``tbase + idx[start+i]`` (``idx < tcount``) and state ``(pos0 + i) mod 2**k``.

    Returns ``(p, n_esc, ok)``; ``ok`` is False for an index outside ``0..tcount-1``.
    """
    lanes = np.int64(1) << k
    xs = np.uint64(RANS_L_BITS + 32 - prec)  # x_max = ((L >> prec) << 32) · freq
    pr = np.uint64(prec)
    if k == 0:  # one state, kept in a register
        x0 = x[0]
        for i in range(n - 1, -1, -1):
            t = np.int64(idx[start + i])
            if t < 0 or t >= tcount:
                return p, n_esc, False
            t += tbase
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
    else:  # interleaved states
        for i in range(n - 1, -1, -1):
            t = np.int64(idx[start + i])
            if t < 0 or t >= tcount:
                return p, n_esc, False
            t += tbase
            s = np.int64(sym[start + i])
            v = s - offset[t]
            esc = np.int64(length[t]) - 2
            if v < 0 or v >= esc:
                ebuf[n_esc] = s
                n_esc += 1
                v = esc
            e = np.uint64(fs[t, v])
            f = e >> _U16
            j = (pos0 + i) & (lanes - 1)
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
def _put_u32(out, o, word):  # pragma: no cover - jitted
    out[o] = word & 0xFF
    out[o + 1] = (word >> 8) & 0xFF
    out[o + 2] = (word >> 16) & 0xFF
    out[o + 3] = word >> 24
    return o + 4


@njit(**_JIT)
def _put_escapes(out, o, ebuf, n_esc):  # pragma: no cover - jitted
    """The escaped values (``ebuf`` holds them last symbol first) as zigzag varints in symbol order."""
    for q in range(n_esc - 1, -1, -1):
        s = np.int64(ebuf[q])
        o = _put_varint(out, o, ((s << 1) ^ (s >> 63)) & 0xFFFFFFFF)
    return o


@njit(**_JIT)
def _write_blob(out, o, k, x, wbuf, p, n, ebuf, n_esc, stream):  # pragma: no cover - jitted
    """Header, final states, the words ``wbuf[p:n]`` and the escapes at ``out[o:]`` in the section or
    (``stream``) the stream layout; returns the new end."""
    nb0 = 3
    while nb0 < STATE_BYTES and (x[0] >> np.uint64(8 * nb0)) != 0:
        nb0 += 1
    out[o] = k | ((nb0 - 3) << 3)
    o += 1
    for j in range(np.int64(1) << k):
        for q in range(nb0 if j == 0 else STATE_BYTES):
            out[o] = (x[j] >> np.uint64(8 * q)) & np.uint64(0xFF)
            o += 1
    if stream:  # escapes, then the words last one first (the decoder reads them from the end)
        o = _put_escapes(out, o, ebuf, n_esc)
        for w in range(n - 1, p - 1, -1):
            o = _put_u32(out, o, np.int64(wbuf[w]))
        return o
    for w in range(p, n):
        o = _put_u32(out, o, np.int64(wbuf[w]))
    return _put_escapes(out, o, ebuf, n_esc)


@njit(**_JIT)
def _encode_kernel(sym, idx, sym2, idx2, offs, streams, tbase, tcount, lanes_log2, fs, length, offset, prec,
                   stream):  # pragma: no cover - jitted
    """Encode blobs: blob ``b`` holds parts ``streams[b]..streams[b+1]-1``, part ``q`` the symbols at
    ``offs[q]:offs[q+1]`` of ``sym`` followed by ``sym2`` (a part lies in one of them: ``sym2`` spares
    the caller a copy of a two-part stream) with tables ``tbase[q] + idx`` (``idx < tcount[q]``), one
    set of states carried across its parts. Returns (bytes, blob offsets, 1 + bad blob or 0)."""
    na = sym.size
    nb = streams.size - 1
    total = np.int64(0)
    nmax = np.int64(0)
    for b in range(nb):
        n = offs[streams[b + 1]] - offs[streams[b]]
        total += 1 + STATE_BYTES * (1 << lanes_log2[b]) + 4 * n + 5 * n
        nmax = max(nmax, n)
    out = np.empty(total, np.uint8)
    out_offs = np.zeros(nb + 1, np.int64)
    wbuf = np.empty(max(nmax, 1), np.uint32)
    ebuf = np.empty(max(nmax, 1), np.int32)
    x = np.empty(1 << MAX_LANES_LOG2, np.uint64)
    o = np.int64(0)
    for b in range(nb):
        first, last = streams[b], streams[b + 1]
        s0 = offs[first]
        n = offs[last] - s0
        k = lanes_log2[b]
        for j in range(np.int64(1) << k):
            x[j] = _L
        p = n
        n_esc = np.int64(0)
        for q in range(last - 1, first - 1, -1):
            start, nq = offs[q], offs[q + 1] - offs[q]
            if start >= na and nq > 0:
                p, n_esc, ok = _encode_part(sym2, idx2, start - na, nq, start - s0, tbase[q], tcount[q], k, fs, length,
                                            offset, prec, wbuf, p, ebuf, n_esc, x)
            else:
                p, n_esc, ok = _encode_part(sym, idx, start, nq, start - s0, tbase[q], tcount[q], k, fs, length,
                                            offset, prec, wbuf, p, ebuf, n_esc, x)
            if not ok:
                return out, out_offs, np.int64(b + 1)
        o = _write_blob(out, o, k, x, wbuf, p, n, ebuf, n_esc, stream)
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
def _read_word(buf, pos, lo, end):  # pragma: no cover - jitted
    """The u32 at ``pos``, or 0 outside ``buf[lo:end]`` (a hostile stream; caught once the part ends)."""
    if pos >= lo and pos + 4 <= end:
        return _read_u32(buf, pos)
    return np.uint64(0)


@njit(**_JIT)
def _open(buf, pos, end, x):  # pragma: no cover - jitted
    """The header byte and initial states at ``buf[pos:end]`` into ``x``: (lanes_log2, position after
    them, error code)."""
    if pos >= end:
        return 0, pos, 1
    h = np.int64(buf[pos])
    k = h & 7
    nb0 = ((h >> 3) & 7) + 3
    if k > MAX_LANES_LOG2 or nb0 > STATE_BYTES or h >= 64:
        return 0, pos, 1
    pos += 1
    lanes = np.int64(1) << k
    if nb0 + STATE_BYTES * (lanes - 1) > end - pos:
        return k, pos, 2
    bad = False
    for j in range(lanes):
        xj = np.uint64(0)
        for q in range(nb0 if j == 0 else STATE_BYTES):
            xj |= np.uint64(buf[pos]) << np.uint64(8 * q)
            pos += 1
        if xj < _L or xj >= (_L << _U32):
            bad = True
        x[j] = xj
    return k, pos, 3 if bad else 0


@njit(**_JIT)
def _decode_part(buf, pos, lo, end, back, idx, start, n, pos0, k, fs, cdf, buckets, length, offset, prec, out,
                 esc_pos, x):  # pragma: no cover - jitted
    """rANS-decode ``n`` symbols into ``out[start:]`` from the states ``x`` and the words of ``buf[lo:end]``
    read from ``pos`` forwards (or ``back``wards); symbol ``i`` uses state ``(pos0 + i) mod 2**k``. Records
    where escapes were decoded in ``esc_pos``. Returns (number of escapes, word cursor, error code:
    4 bad index, 5 words overrun)."""
    step = -4 if back else 4
    first = -4 if back else 0  # the next word's offset from the cursor
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
                x0 = (x0 << _U32) | _read_word(buf, wp + first, lo, end)
                wp += step
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
            j = (pos0 + i) & (lanes - 1)
            xj = x[j]
            slot = xj & mask
            v = np.int64(buckets[t, slot >> bshift])
            while cdf[t, v + 1] <= slot:
                v += 1
            e = np.uint64(fs[t, v])
            xj = (e >> _U16) * (xj >> pr) + slot - (e & _M16)
            if xj < _L:
                xj = (xj << _U32) | _read_word(buf, wp + first, lo, end)
                wp += step
            x[j] = xj
            out[start + i] = v + offset[t]
            if v == length[t] - 2:
                esc_pos[n_esc] = start + i
                n_esc += 1
    if wp < lo or wp > end:
        return n_esc, wp, 5
    return n_esc, wp, 0


@njit(**_JIT)
def _states_ok(x, k):  # pragma: no cover - jitted
    for j in range(np.int64(1) << k):  # noqa: SIM110 - no generators in a jitted function
        if x[j] != _L:
            return False
    return True


@njit(**_JIT)
def _decode_kernel(buf, boffs, idx, offs, fs, cdf, buckets, length, offset, prec):  # pragma: no cover - jitted
    """Decode section blobs ``buf[boffs[b]:boffs[b+1]]`` into ``offs[b+1]-offs[b]`` symbols each.

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
        end = boffs[b + 1]
        n_esc = 0
        k, pos, err = _open(buf, boffs[b], end, x)
        if err == 0:
            n_esc, pos, err = _decode_part(buf, pos, pos, end, False, idx, offs[b], offs[b + 1] - offs[b], 0, k, fs,
                                           cdf, buckets, length, offset, prec, out, esc_pos, x)
        if err == 0 and not _states_ok(x, k):
            err = 5
        if err:
            errs[b] = err
            continue
        for q in range(n_esc):  # escapes, forwards after the words
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


# stream decoder state (``cur``): opened, lanes_log2, escape cursor (forwards), word cursor (backwards),
# symbols decoded, failed
_OPENED, _K, _EP, _WP, _POS, _FAILED = range(6)


@njit(**_JIT)
def _stream_kernel(buf, cur, x, idx, fs, cdf, buckets, length, offset, prec):  # pragma: no cover - jitted
    """The next part of a stream (``idx.size`` symbols): opens the stream on the first call, decodes the
    part reading words backwards from the word cursor, then its escapes forwards from the escape cursor.
    Returns (symbols, error code)."""
    n = idx.size
    out = np.empty(n, np.int32)
    if cur[_FAILED]:
        return out, 10
    if cur[_OPENED] == 0:
        k, ep, err = _open(buf, 0, buf.size, x)
        if err:
            cur[_FAILED] = 1
            return out, err
        cur[_OPENED] = 1
        cur[_K] = k
        cur[_EP] = ep
        cur[_WP] = buf.size
    ep = cur[_EP]
    wp = cur[_WP]
    esc_pos = np.empty(max(n, 1), np.int64)
    n_esc, wp, err = _decode_part(buf, wp, ep, wp, True, idx, 0, n, cur[_POS], cur[_K], fs, cdf, buckets, length,
                                  offset, prec, out, esc_pos, x)
    for q in range(n_esc if err == 0 else 0):  # this part's escapes, up to the words
        u, ep, ok = _read_varint(buf, ep, wp)
        if not ok:
            err = 6
            break
        if u > 0xFFFFFFFF:
            err = 8
            break
        out[esc_pos[q]] = (u >> 1) ^ -(u & 1)
    if err:
        cur[_FAILED] = 1
        return out, err
    cur[_EP] = ep
    cur[_WP] = wp
    cur[_POS] += n
    return out, 0


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


@dataclass(frozen=True)
class _EncoderSet:
    """The encoder's view of the table sets of a stream's parts, concatenated into one (part ``q``'s
    table ``t`` is ``tbase[q] + t``), or of one table set (``tbase = [0]``)."""

    fs: np.ndarray
    length: np.ndarray
    offset: np.ndarray
    tbase: np.ndarray  # int64 [parts]
    tcount: np.ndarray  # int64 [parts]
    prec: np.int64


_prepared: dict[int, tuple[weakref.ref, _Prepared]] = {}
_sets: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], _EncoderSet]] = {}


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


def prepare_set(tables: Sequence[CdfTables]) -> _EncoderSet:
    """The encoder's tables for a stream whose parts use ``tables`` in order (built once per tuple)."""
    key = tuple(id(t) for t in tables)
    hit = _sets.get(key)
    if hit is not None and all(r() is t for r, t in zip(hit[0], tables)):
        return hit[1]
    if len({t.precision for t in tables}) != 1:
        raise ValueError("the parts of a stream must share one table precision")
    preps = [prepare(t) for t in tables]
    counts = np.array([t.num_tables for t in tables], np.int64)
    if len(preps) == 1:
        fs, length, offset = preps[0].fs, preps[0].length, preps[0].offset
    else:
        uniq = list({id(t): p for t, p in zip(tables, preps)}.items())  # each table set once
        width = max(p.fs.shape[1] for _, p in uniq)
        fs = np.zeros((sum(p.fs.shape[0] for _, p in uniq), width), np.uint32)
        base, row = {}, 0
        for tid, p in uniq:
            fs[row:row + p.fs.shape[0], :p.fs.shape[1]] = p.fs
            base[tid] = row
            row += p.fs.shape[0]
        length = np.concatenate([p.length for _, p in uniq])
        offset = np.concatenate([p.offset for _, p in uniq])
    tbase = np.array([0] if len(preps) == 1 else [base[id(t)] for t in tables], np.int64)
    enc = _EncoderSet(fs, length, offset, tbase, counts, preps[0].prec)
    drop = lambda _r, k=key: _sets.pop(k, None)  # noqa: E731 - a weakref callback
    _sets[key] = (tuple(weakref.ref(t, drop) for t in tables), enc)
    return enc


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
    return _as_int32(np.concatenate([np.ravel(a) for a in arrays]), what), offs


def _readonly_bytes(blobs: Sequence[bytes | memoryview]) -> np.ndarray:
    """The blobs back to back as one read-only uint8 array (one array type for the kernels)."""
    buf = np.frombuffer(blobs[0] if len(blobs) == 1 else b"".join(blobs), dtype=np.uint8)
    if buf.flags.writeable:
        buf = buf.view()
        buf.setflags(write=False)
    return buf


class NumbaStream(StreamDecoder):
    """A stream being decoded (``NumbaCoder.decode_stream``): one kernel call per part."""

    def __init__(self, blob: bytes | memoryview) -> None:
        self._buf = _readonly_bytes([blob])
        self._cur = np.zeros(6, np.int64)
        self._x = np.empty(1 << MAX_LANES_LOG2, np.uint64)

    def _fail(self, code: int) -> PacketError:
        self._cur[_FAILED] = 1
        return PacketError(f"numba rANS stream: {_ERRORS.get(code, code)}")

    def next(self, index: np.ndarray, tables: CdfTables) -> np.ndarray:
        p = prepare(tables)
        out, err = _stream_kernel(self._buf, self._cur, self._x, _as_int32(index, "index"), p.fs, p.cdf, p.buckets,
                                  p.length, p.offset, p.prec)
        if err == 4:
            self._cur[_FAILED] = 1
            raise ValueError(f"table index outside 0..{tables.num_tables - 1}")
        if err:
            raise self._fail(int(err))
        return out

    def finish(self) -> None:
        cur = self._cur
        if cur[_FAILED] or not cur[_OPENED]:
            raise self._fail(10)
        if cur[_EP] != cur[_WP]:
            raise self._fail(9)
        if not (self._x[: 1 << int(cur[_K])] == RANS_L).all():
            raise self._fail(5)


class NumbaCoder(EntropyCoder):
    """Interleaved rANS (module docstring); ``lanes_log2=None`` picks the interleaving by size."""

    coder_id = 2
    name = "numba"

    def __init__(self, lanes_log2: int | None = None) -> None:
        if lanes_log2 is not None and not 0 <= lanes_log2 <= MAX_LANES_LOG2:
            raise ValueError(f"lanes_log2 must lie in 0..{MAX_LANES_LOG2}")
        self.lanes_log2 = lanes_log2

    def _lanes(self, sizes: np.ndarray) -> np.ndarray:
        """lanes_log2 per blob of ``sizes`` symbols."""
        if sizes.size == 1:  # the common call: no per-call array building
            return _ONE_LANES[self.lanes_log2 if self.lanes_log2 is not None else lanes_log2_for(int(sizes[0]))]
        if self.lanes_log2 is not None:
            return np.full(sizes.size, self.lanes_log2, np.int64)
        return np.array([lanes_log2_for(int(n)) for n in sizes], np.int64)

    def _encode(self, sym: np.ndarray, idx: np.ndarray, offs: np.ndarray, streams: np.ndarray, enc: _EncoderSet,
                tbase: np.ndarray, tcount: np.ndarray, stream: bool, sym2: np.ndarray = _EMPTY,
                idx2: np.ndarray = _EMPTY) -> list[bytes]:
        count = streams.size - 1
        lanes = self._lanes(np.diff(offs[streams]))
        out, out_offs, err = _encode_kernel(sym, idx, sym2, idx2, offs, streams, tbase, tcount, lanes, enc.fs,
                                            enc.length, enc.offset, enc.prec, stream)
        if err:
            raise ValueError("table index outside the tables' range")
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

    # -- stream API: a packet's parts in one blob ---------------------------------------------------
    def encode_stream(self, parts: Sequence[Part]) -> bytes:
        if not parts:
            raise ValueError("a stream needs at least one part")
        enc = prepare_set([p[2] for p in parts])
        if len(parts) == 2:  # MSHP's z and y: passed as they are, no concatenation
            (z, zidx, _), (y, yidx, _) = parts
            z, zidx, y, yidx = _as_int32(z, "symbols"), _as_int32(zidx, "index"), _as_int32(y, "symbols"), \
                _as_int32(yidx, "index")
            if z.size != zidx.size or y.size != yidx.size:
                raise ValueError("symbols and index differ in size")
            offs = np.array([0, z.size, z.size + y.size], np.int64)
            return self._encode(z, zidx, offs, _TWO_PARTS, enc, enc.tbase, enc.tcount, True, y, yidx)[0]
        sym, offs = _concat([p[0] for p in parts], "symbols")
        idx, ioffs = _concat([p[1] for p in parts], "index")
        if not np.array_equal(offs, ioffs):
            raise ValueError("symbols and index differ in size")
        streams = np.array([0, len(parts)], np.int64) if len(parts) > 1 else _ONE_STREAM
        return self._encode(sym, idx, offs, streams, enc, enc.tbase, enc.tcount, True)[0]

    def decode_stream(self, blob: bytes | memoryview) -> NumbaStream:
        return NumbaStream(blob)

    # -- batch API (section blobs): one kernel call for the whole batch --------------------------------
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
        enc = prepare_set([tables])
        count = len(symbols)
        return self._encode(sym, idx, offs, np.arange(count + 1, dtype=np.int64), enc,
                            np.zeros(count, np.int64), np.full(count, tables.num_tables, np.int64), False)

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

    # -- single latent (a section blob) -------------------------------------------------------------
    def encode(self, symbols: np.ndarray, index: np.ndarray, tables: CdfTables) -> bytes:
        sym, idx = _as_int32(symbols, "symbols"), _as_int32(index, "index")
        if sym.size != idx.size:
            raise ValueError("symbols and index differ in size")
        enc = prepare_set([tables])
        return self._encode(sym, idx, np.array([0, sym.size], np.int64), _ONE_STREAM, enc, enc.tbase, enc.tcount,
                            False)[0]

    def decode(self, blob: bytes | memoryview, index: np.ndarray, tables: CdfTables) -> np.ndarray:
        idx = _as_int32(index, "index")
        return self._decode([blob], idx, np.array([0, idx.size], np.int64), tables)

    @staticmethod
    def cache_info() -> dict[str, object]:
        """Where the compiled kernels are cached on disk, and how many came from there (hits) or were
        compiled in this process (misses)."""
        kernels = KERNELS
        return {"dir": kernels[0].stats.cache_path,
                "hits": sum(sum(k.stats.cache_hits.values()) for k in kernels),
                "misses": sum(sum(k.stats.cache_misses.values()) for k in kernels)}

    def warmup(self) -> None:
        """Load (or compile, then cache on disk) every kernel with the types used in production."""
        cdf = np.array([[0, 30000, 65535, 65536, 65536], [0, 1, 2, 3, 65536]], np.int32)
        tables = CdfTables.create(cdf, np.array([4, 5]), np.array([-1, 0]))
        other = CdfTables.create(cdf[:1], np.array([4]), np.array([0]))
        rng = np.random.default_rng(0)
        sym = [rng.integers(-3, 4, n).astype(np.int32) for n in (5, 40)]
        idx = [rng.integers(0, 2, s.size).astype(np.int32) for s in sym]
        blobs = self.encode_batch(sym, idx, tables)
        self.decode_batch(blobs, idx, tables)
        self.decode(memoryview(bytearray(blobs[0])), idx[0], tables)
        zidx = np.zeros(3, np.int32)
        blob = self.encode_stream([(sym[0][:3], zidx, other), (sym[1], idx[1], tables)])
        for data in (blob, memoryview(bytearray(blob))):
            stream = self.decode_stream(data)
            stream.next(zidx, other)
            stream.next(idx[1], tables)
            stream.finish()


#: every compiled kernel (the disk cache covers them all)
KERNELS = (_encode_kernel, _decode_kernel, _stream_kernel, _bucket_table)
