"""Lossless coding: decode(encode(s)) == s for any int32 latent, both families' table layouts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from splitbits.runtime.codec import CODERS, CdfTables, get_coder
from splitbits.runtime.codec.tables import zigzag_decode, zigzag_encode
from splitbits.runtime.errors import BundleError, PacketError

I32 = np.iinfo(np.int32)


def make_tables(num: int, seed: int = 0, max_len: int = 40) -> CdfTables:
    """Random valid CompressAI-layout tables (16-bit, every symbol with mass, escape last)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, max_len, num)
    cdf = np.zeros((num, int(lengths.max())), np.int32)
    for t, ln in enumerate(lengths):
        w = rng.random(ln - 1) ** 3 + 1e-3
        f = np.maximum(1, np.floor(w / w.sum() * (65536 - (ln - 1)))).astype(np.int64) + 0
        f[np.argmax(f)] += 65536 - f.sum()
        cdf[t, :ln] = np.concatenate(([0], np.cumsum(f)))
        cdf[t, ln:] = 65536
    offset = -(lengths // 2)
    return CdfTables.create(cdf, lengths, offset)


TABLES = make_tables(24)
Z_TABLES = make_tables(5, seed=7, max_len=6)  # narrow supports: z values escape often
CODER_NAMES = [n for n in CODERS]


@pytest.mark.parametrize("name", CODER_NAMES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_roundtrip_arbitrary_int32(name, data):
    coder = get_coder(name)
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12))
    symbols = data.draw(hnp.arrays(np.int32, shape, elements=st.one_of(
        st.integers(-20, 20), st.integers(I32.min, I32.max), st.sampled_from([I32.min, I32.max, 0, -1]))))
    index = data.draw(hnp.arrays(np.int32, shape, elements=st.integers(0, TABLES.num_tables - 1)))
    blob = coder.encode(symbols, index, TABLES)
    out = coder.decode(blob, index, TABLES)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, symbols.reshape(-1))


@pytest.mark.parametrize("name", CODER_NAMES)
@pytest.mark.parametrize("value", [I32.min, I32.max, 10**6, -(10**6)])
def test_all_escape_latent(name, value):
    coder = get_coder(name)
    idx = np.arange(3000, dtype=np.int32) % TABLES.num_tables
    sym = np.full(3000, value, np.int32)
    np.testing.assert_array_equal(coder.decode(coder.encode(sym, idx, TABLES), idx, TABLES), sym)


@pytest.mark.parametrize("name", CODER_NAMES)
def test_size_close_to_ideal(name):
    """In-support symbols cost within 0.5 % + 16 bytes of −Σlog₂p under the tables."""
    rng = np.random.default_rng(1)
    idx = rng.integers(0, TABLES.num_tables, 20000).astype(np.int32)
    sym = np.empty_like(idx)
    for t in range(TABLES.num_tables):
        sel = idx == t
        p = TABLES.pmf(t)[:-1] / TABLES.pmf(t)[:-1].sum()
        sym[sel] = rng.choice(len(p), sel.sum(), p=p) + TABLES.offset[t]
    blob = get_coder(name).encode(sym, idx, TABLES)
    ideal = TABLES.ideal_bits(sym, idx) / 8
    assert len(blob) <= ideal * 1.005 + 16


@pytest.mark.parametrize("name", CODER_NAMES)
def test_hostile_blob_is_an_error_or_garbage_never_a_crash(name):
    coder = get_coder(name)
    rng = np.random.default_rng(2)
    idx = rng.integers(0, TABLES.num_tables, 500).astype(np.int32)
    good = coder.encode(rng.integers(-3, 3, 500).astype(np.int32), idx, TABLES)
    for blob in [b"", b"\xff" * 7, good[: len(good) // 2], bytes(rng.integers(0, 256, 300, dtype=np.uint8)),
                 good + b"\x00\x00"]:
        try:
            out = coder.decode(blob, idx, TABLES)
        except PacketError:
            continue
        assert out.shape == (500,) and out.dtype == np.int32


def test_bad_index_is_rejected():
    with pytest.raises(ValueError):
        get_coder().encode(np.zeros(4, np.int32), np.array([0, 1, 2, 99], np.int32), TABLES)


@given(hnp.arrays(np.int64, st.integers(0, 200), elements=st.integers(-(2**63), 2**63 - 1)))
def test_zigzag_roundtrip(values):
    data = zigzag_encode(values)
    out, used = zigzag_decode(data + b"\x05junk", len(values))
    assert used == len(data)
    np.testing.assert_array_equal(out, values)


def test_zigzag_truncated():
    data = zigzag_encode(np.array([300, -7, 2**40]))
    with pytest.raises(PacketError):
        zigzag_decode(data[:-1], 3)
    with pytest.raises(PacketError):
        zigzag_decode(b"\x80" * 11 + b"\x01", 1)


@pytest.mark.parametrize("mutate", ["start", "end", "flat", "shape", "length"])
def test_invalid_tables_are_bundle_errors(mutate):
    cdf, ln, off = TABLES.cdf.copy(), TABLES.length.copy(), TABLES.offset.copy()
    if mutate == "start":
        cdf[0, 0] = 5
    elif mutate == "end":
        cdf[1, ln[1] - 1] = 100
    elif mutate == "flat":
        cdf[2, 2] = cdf[2, 1]
    elif mutate == "shape":
        ln = ln[:-1]
    else:
        ln[0] = cdf.shape[1] + 1
    with pytest.raises(BundleError):
        CdfTables.create(cdf, ln, off)


# ---------------------------------------------------------------------------------------------
# the stream API: one blob for a packet's parts (MSHP: z then y; FP: y), decoded part by part
# ---------------------------------------------------------------------------------------------

int32s = st.one_of(st.integers(-20, 20), st.integers(I32.min, I32.max), st.sampled_from([I32.min, I32.max, 0, -1]))


@st.composite
def stream_parts(draw) -> list[tuple[np.ndarray, np.ndarray, CdfTables]]:
    """One or two parts (the first with the narrow z tables when there are two), arbitrary int32 symbols;
    a part may be all escapes (±2³¹ extremes or huge values everywhere)."""
    count = draw(st.integers(1, 2))
    parts = []
    for q in range(count):
        tables = Z_TABLES if count == 2 and q == 0 else TABLES
        n = draw(st.integers(1, 400))
        index = draw(hnp.arrays(np.int32, n, elements=st.integers(0, tables.num_tables - 1)))
        if draw(st.booleans()):
            symbols = draw(hnp.arrays(np.int32, n, elements=int32s))
        else:
            symbols = np.full(n, draw(st.sampled_from([I32.min, I32.max, 10**9, -(10**9)])), np.int32)
        parts.append((symbols, index, tables))
    return parts


@pytest.mark.parametrize("name", CODER_NAMES)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=stream_parts())
def test_stream_roundtrip_arbitrary_int32(name, parts):
    coder = get_coder(name)
    stream = coder.decode_stream(coder.encode_stream(parts))
    for symbols, index, tables in parts:
        out = stream.next(index, tables)
        assert out.dtype == np.int32
        np.testing.assert_array_equal(out, symbols)
    stream.finish()


@pytest.mark.parametrize("name", CODER_NAMES)
def test_stream_z_escapes_are_exact_before_y_is_decoded(name):
    """The server computes y's indexes from the decoded z: z's escaped values must be exact by then."""
    coder = get_coder(name)
    rng = np.random.default_rng(3)
    z = np.array([I32.min, 5, I32.max, -7, 10**6, 0] * 5, np.int32)
    zidx = (np.arange(z.size) % Z_TABLES.num_tables).astype(np.int32)

    def y_index(zs: np.ndarray) -> np.ndarray:  # a stand-in for the hyper-synthesis
        return (np.abs(zs.astype(np.int64)) % TABLES.num_tables).astype(np.int32).repeat(10)

    y = rng.integers(-30, 30, z.size * 10).astype(np.int32)
    blob = coder.encode_stream([(z, zidx, Z_TABLES), (y, y_index(z), TABLES)])
    stream = coder.decode_stream(blob)
    z_out = stream.next(zidx, Z_TABLES)
    np.testing.assert_array_equal(z_out, z)
    np.testing.assert_array_equal(stream.next(y_index(z_out), TABLES), y)
    stream.finish()


@pytest.mark.parametrize("name", CODER_NAMES)
def test_stream_size_close_to_ideal(name):
    """A packet's stream costs within 0.5 % + 16 bytes of −Σlog₂p under the tables, z and y together."""
    rng = np.random.default_rng(5)
    parts = []
    for tables, n in ((Z_TABLES, 300), (TABLES, 5000)):
        idx = rng.integers(0, tables.num_tables, n).astype(np.int32)
        sym = np.empty_like(idx)
        for t in range(tables.num_tables):
            sel = idx == t
            p = tables.pmf(t)[:-1] / tables.pmf(t)[:-1].sum()
            sym[sel] = rng.choice(len(p), sel.sum(), p=p) + tables.offset[t]
        parts.append((sym, idx, tables))
    ideal = sum(t.ideal_bits(s, i) for s, i, t in parts) / 8
    assert len(get_coder(name).encode_stream(parts)) <= ideal * 1.005 + 16


@pytest.mark.parametrize("name", CODER_NAMES)
def test_hostile_stream_is_an_error_or_garbage_never_a_crash(name):
    coder = get_coder(name)
    rng = np.random.default_rng(2)
    zidx = rng.integers(0, Z_TABLES.num_tables, 40).astype(np.int32)
    yidx = rng.integers(0, TABLES.num_tables, 500).astype(np.int32)
    good = coder.encode_stream([(rng.integers(-3, 3, 40).astype(np.int32), zidx, Z_TABLES),
                                (rng.integers(-3, 3, 500).astype(np.int32), yidx, TABLES)])
    for blob in [b"", b"\xff" * 7, good[: len(good) // 2], bytes(rng.integers(0, 256, 300, dtype=np.uint8)),
                 good + b"\x00\x00", good[:-1]]:
        stream = None
        try:
            stream = coder.decode_stream(blob)
            outs = [stream.next(zidx, Z_TABLES), stream.next(yidx, TABLES)]
            stream.finish()
        except PacketError:
            if stream is not None:  # once refused, a stream refuses everything after
                with pytest.raises(PacketError):
                    stream.next(yidx, TABLES)
                with pytest.raises(PacketError):
                    stream.finish()
            continue
        assert [o.shape for o in outs] == [(40,), (500,)] and all(o.dtype == np.int32 for o in outs)


@pytest.mark.parametrize("name", CODER_NAMES)
def test_stream_finished_before_any_part_is_refused(name):
    coder = get_coder(name)
    blob = coder.encode_stream([(np.zeros(3, np.int32), np.zeros(3, np.int32), TABLES)])
    with pytest.raises(PacketError):
        coder.decode_stream(blob).finish()


def test_empty_stream_is_a_value_error():
    for name in CODER_NAMES:
        with pytest.raises(ValueError):
            get_coder(name).encode_stream([])
