"""The numba rANS coder: lossless for any int32 latent (property tests, both families' table layouts),
close to −Σlog₂p, a stable wire format, a batch API, and a decoder that treats its input as hostile."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from splitbits.runtime.codec import DEFAULT_CODER, CdfTables, get_coder
from splitbits.runtime.codec import numba_coder as nc
from splitbits.runtime.errors import PacketError

I32 = np.iinfo(np.int32)


def make_tables(num: int, seed: int = 0, max_len: int = 40, precision: int = 16) -> CdfTables:
    """Random valid CompressAI-layout tables (every symbol with mass, escape last)."""
    rng = np.random.default_rng(seed)
    total = 1 << precision
    lengths = rng.integers(3, max_len, num)
    cdf = np.zeros((num, int(lengths.max())), np.int32)
    for t, ln in enumerate(lengths):
        w = rng.random(ln - 1) ** 3 + 1e-3
        f = np.maximum(1, np.floor(w / w.sum() * (total - (ln - 1)))).astype(np.int64)
        f[np.argmax(f)] += total - f.sum()
        cdf[t, :ln] = np.concatenate(([0], np.cumsum(f)))
    offset = -(lengths // 2) + rng.integers(-3, 4, num)
    return CdfTables.create(cdf, lengths, offset, precision)


def gaussian_tables(scales: np.ndarray, precision: int = 16) -> CdfTables:
    """Scale tables shaped like compressai's GaussianConditional (MSHP), built here in numpy."""
    from math import erf, sqrt

    rows, lens, offs = [], [], []
    total = 1 << precision
    for s in scales:
        half = int(np.ceil(s * 6.0))
        v = np.arange(-half, half + 1)
        cdfv = np.array([0.5 * (1 + erf((x + 0.5) / (s * sqrt(2)))) for x in v])
        pmf = np.diff(np.concatenate(([0.0], cdfv)))
        pmf = np.append(pmf, 1e-9)  # escape
        f = np.maximum(1, np.round(pmf / pmf.sum() * (total - len(pmf)))).astype(np.int64)
        f[np.argmax(f)] += total - f.sum()
        rows.append(np.concatenate(([0], np.cumsum(f))))
        lens.append(len(f) + 1)
        offs.append(-half)
    cdf = np.zeros((len(rows), max(lens)), np.int32)
    for t, r in enumerate(rows):
        cdf[t, : len(r)] = r
    return CdfTables.create(cdf, np.array(lens), np.array(offs), precision)


FP_TABLES = make_tables(12, seed=3)  # per-channel tables (FP, and the z latent of MSHP)
MSHP_TABLES = gaussian_tables(np.exp(np.linspace(np.log(0.11), np.log(40.0), 16)))  # scale tables (MSHP y)
CODER = nc.NumbaCoder()

int32s = st.one_of(st.integers(-8, 8), st.integers(I32.min, I32.max),
                   st.sampled_from([I32.min, I32.min + 1, I32.max, I32.max - 1, 0, -1]))


@st.composite
def latents(draw, family: str):
    """(symbols [C, H, W], index, tables) as each family indexes its tables."""
    if family == "fp":
        c = draw(st.integers(1, FP_TABLES.num_tables))
        h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        index = np.broadcast_to(np.arange(c, dtype=np.int32)[:, None, None], (c, h, w))
        tables = FP_TABLES
    else:
        shape = draw(hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=9))
        index = draw(hnp.arrays(np.int32, shape, elements=st.integers(0, MSHP_TABLES.num_tables - 1)))
        tables = MSHP_TABLES
    symbols = draw(hnp.arrays(np.int32, index.shape, elements=int32s))
    return symbols, index, tables


@pytest.mark.parametrize("family", ["fp", "mshp"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_roundtrip_property(family, data):
    symbols, index, tables = data.draw(latents(family))
    lanes = data.draw(st.sampled_from([None, 0, 1, 3, nc.MAX_LANES_LOG2]))
    coder = nc.NumbaCoder(lanes)
    blob = coder.encode(symbols, index, tables)
    out = coder.decode(blob, index, tables)
    assert out.dtype == np.int32 and out.shape == (symbols.size,)
    np.testing.assert_array_equal(out, symbols.reshape(-1))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_stream_roundtrip_property(data):
    """z (per-channel tables) then y (scale tables) in one stream, with interleaved states carried across
    the parts: lossless for any int32, z's escapes included."""
    z, zidx, ztables = data.draw(latents("fp"))
    y, yidx, ytables = data.draw(latents("mshp"))
    coder = nc.NumbaCoder(data.draw(st.sampled_from([None, 0, 1, 3, nc.MAX_LANES_LOG2])))
    blob = coder.encode_stream([(z, zidx, ztables), (y, yidx, ytables)])
    stream = coder.decode_stream(blob)
    np.testing.assert_array_equal(stream.next(zidx, ztables), z.reshape(-1))
    np.testing.assert_array_equal(stream.next(yidx, ytables), y.reshape(-1))
    stream.finish()


@settings(max_examples=40, deadline=None)
@given(value=int32s, n=st.integers(0, 700), family=st.sampled_from(["fp", "mshp"]))
def test_all_escape_and_constant_latents(value, n, family):
    tables = FP_TABLES if family == "fp" else MSHP_TABLES
    index = (np.arange(n) % tables.num_tables).astype(np.int32)
    symbols = np.full(n, value, np.int32)
    np.testing.assert_array_equal(CODER.decode(CODER.encode(symbols, index, tables), index, tables), symbols)


@pytest.mark.parametrize("extreme", [I32.min, I32.max])
def test_extremes_everywhere_cost_their_escape_bytes(extreme):
    index = np.zeros(1000, np.int32)
    symbols = np.full(1000, extreme, np.int32)
    blob = CODER.encode(symbols, index, FP_TABLES)
    assert len(blob) <= FP_TABLES.ideal_bits(symbols, index) / 8 + 16
    np.testing.assert_array_equal(CODER.decode(blob, index, FP_TABLES), symbols)


@pytest.mark.parametrize("tables", [FP_TABLES, MSHP_TABLES], ids=["fp", "mshp"])
@pytest.mark.parametrize("n", [1, 50, 3000, 75000])
def test_bytes_within_0p1pct_16B_of_ideal(tables, n):
    rng = np.random.default_rng(n)
    index = rng.integers(0, tables.num_tables, n).astype(np.int32)
    symbols = np.empty(n, np.int32)
    for t in range(tables.num_tables):
        sel = index == t
        p = tables.pmf(t)[:-1] / tables.pmf(t)[:-1].sum()
        symbols[sel] = rng.choice(len(p), int(sel.sum()), p=p) + tables.offset[t]
    symbols[::97] = 10**6  # some escapes too
    ideal = tables.ideal_bits(symbols, index) / 8
    assert len(CODER.encode(symbols, index, tables)) <= ideal * 1.001 + 16


def test_lower_precision_tables():
    tables = make_tables(5, seed=9, precision=12)
    rng = np.random.default_rng(0)
    index = rng.integers(0, 5, 5000).astype(np.int32)
    symbols = rng.integers(-40, 40, 5000).astype(np.int32)
    np.testing.assert_array_equal(CODER.decode(CODER.encode(symbols, index, tables), index, tables), symbols)


def test_batch_api_matches_single_calls():
    rng = np.random.default_rng(4)
    sizes = [0, 1, 17, 2000, 5]
    syms = [rng.integers(-20, 20, n).astype(np.int32) for n in sizes]
    syms[2][3] = I32.min
    idx = [rng.integers(0, MSHP_TABLES.num_tables, n).astype(np.int32) for n in sizes]
    blobs = CODER.encode_batch(syms, idx, MSHP_TABLES)
    assert blobs == [CODER.encode(s, i, MSHP_TABLES) for s, i in zip(syms, idx)]
    outs = CODER.decode_batch([memoryview(b) for b in blobs], idx, MSHP_TABLES)
    for o, s in zip(outs, syms):
        np.testing.assert_array_equal(o, s)
    assert CODER.encode_batch([], [], MSHP_TABLES) == [] and CODER.decode_batch([], [], MSHP_TABLES) == []


def test_batch_error_names_the_blob():
    idx = [np.zeros(10, np.int32)] * 3
    blobs = CODER.encode_batch([np.zeros(10, np.int32)] * 3, idx, FP_TABLES)
    with pytest.raises(PacketError, match="blob 1"):
        CODER.decode_batch([blobs[0], blobs[1][:-1], blobs[2]], idx, FP_TABLES)


def test_constriction_base_class_batch_api_still_works():
    coder = get_coder("constriction")
    syms = [np.arange(-5, 5, dtype=np.int32), np.zeros(3, np.int32)]
    idx = [np.zeros(10, np.int32), np.ones(3, np.int32)]
    outs = coder.decode_batch(coder.encode_batch(syms, idx, FP_TABLES), idx, FP_TABLES)
    for o, s in zip(outs, syms):
        np.testing.assert_array_equal(o, s)


def test_default_coder_is_numba_with_wire_id_2():
    assert DEFAULT_CODER == "numba"
    assert get_coder() is get_coder("numba") is get_coder(2)
    assert get_coder().coder_id == 2


def test_wire_format_is_stable():
    """A fixed latent gives these exact bytes: any decoder of the same kind reads any encoder's packets.
    (If this changes on purpose, the packet format needs a new coder id, not an edit here.)"""
    tables = make_tables(3, seed=1)
    symbols = np.array([0, 1, -1, 2, 1000, -3, 0, 0, I32.min, 4], np.int32)
    index = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], np.int32)
    blob = CODER.encode(symbols, index, tables)
    assert blob.hex() == GOLDEN_BLOB
    np.testing.assert_array_equal(CODER.decode(bytes.fromhex(GOLDEN_BLOB), index, tables), symbols)


GOLDEN_BLOB = "088480f607e27729237f80a4a2d00fffffffff0f"


def test_stream_wire_format_is_stable():
    """The same for a stream (a version-2 packet's payload): header and state, z's then y's escapes, the
    words from the end. One stream of both parts is 5 bytes shorter than their two section blobs."""
    tables, other = make_tables(3, seed=1), make_tables(2, seed=4)
    z = np.array([0, 1, -1, 2, 1000, -3, 0, 0, I32.min, 4], np.int32)
    zidx = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], np.int32)
    y = np.array([3, -2, 0, 0, I32.max, 1], np.int32)
    yidx = np.array([0, 0, 1, 0, 1, 0], np.int32)
    parts = [(z, zidx, tables), (y, yidx, other)]
    blob = CODER.encode_stream(parts)
    assert blob.hex() == GOLDEN_STREAM
    assert len(blob) == len(CODER.encode(z, zidx, tables)) + len(CODER.encode(y, yidx, other)) - 5
    stream = CODER.decode_stream(bytes.fromhex(GOLDEN_STREAM))
    np.testing.assert_array_equal(stream.next(zidx, tables), z)
    np.testing.assert_array_equal(stream.next(yidx, other), y)
    stream.finish()


GOLDEN_STREAM = "108e804d1624d00fffffffff0ffeffffff0fa9b176c4876f716bce89a93f"


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError, match="table index"):
        CODER.encode(np.zeros(3, np.int32), np.array([0, 1, 99], np.int32), FP_TABLES)
    with pytest.raises(ValueError, match="table index"):
        CODER.decode(CODER.encode(np.zeros(3, np.int32), np.zeros(3, np.int32), FP_TABLES),
                     np.array([0, -1, 0], np.int32), FP_TABLES)
    with pytest.raises(ValueError, match="differ in size"):
        CODER.encode(np.zeros(3, np.int32), np.zeros(4, np.int32), FP_TABLES)
    with pytest.raises(ValueError, match="int32"):
        CODER.encode(np.array([2**40]), np.zeros(1, np.int32), FP_TABLES)
    with pytest.raises(ValueError, match="integers"):
        CODER.encode(np.zeros(2, np.float32), np.zeros(2, np.int32), FP_TABLES)
    with pytest.raises(ValueError):
        nc.NumbaCoder(lanes_log2=6)


# ---------------------------------------------------------------------------------------------
# hostile blobs: an error (or, at worst, wrong symbols the packet checksums catch), never a crash,
# a hang, an out-of-bounds access or an unbounded allocation
# ---------------------------------------------------------------------------------------------


def _decode_or_error(blob: bytes, index: np.ndarray, tables: CdfTables) -> np.ndarray | None:
    try:
        out = CODER.decode(blob, index, tables)
    except PacketError:
        return None
    assert out.shape == (index.size,) and out.dtype == np.int32
    return out


def _good(n: int = 400, seed: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    index = rng.integers(0, MSHP_TABLES.num_tables, n).astype(np.int32)
    symbols = rng.integers(-6, 7, n).astype(np.int32)
    symbols[::50] = -(10**7)
    return CODER.encode(symbols, index, MSHP_TABLES), index, symbols


def test_every_truncation_and_extension_is_rejected():
    blob, index, _ = _good()
    for cut in range(len(blob)):
        assert _decode_or_error(blob[:cut], index, MSHP_TABLES) is None, cut
    for extra in (b"\x00", b"\x01\x02\x03\x04", b"\xff" * 9):
        assert _decode_or_error(blob + extra, index, MSHP_TABLES) is None


def test_single_bit_flips_never_crash_and_rans_flips_are_caught():
    from splitbits.runtime.codec.tables import zigzag_encode

    blob, index, symbols = _good(300, seed=1)
    escaped = MSHP_TABLES.values(symbols, index)[1]
    rans_end = len(blob) - len(zigzag_encode(symbols[escaped]))  # escape values are raw: the packet CRC guards them
    silent = 0
    for i in range(len(blob)):
        for bit in range(8):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            out = _decode_or_error(bytes(bad), index, MSHP_TABLES)
            silent += i < rans_end and out is not None and not np.array_equal(out, symbols)
    assert silent <= 0.01 * 8 * rans_end  # rANS's final-state check catches (almost) every flip


def _good_stream(seed: int = 0) -> tuple[bytes, list[tuple[np.ndarray, np.ndarray, CdfTables]]]:
    rng = np.random.default_rng(seed)
    zidx = (np.arange(60) % FP_TABLES.num_tables).astype(np.int32)
    z = rng.integers(-4, 5, 60).astype(np.int32)
    z[::13] = I32.min
    yidx = rng.integers(0, MSHP_TABLES.num_tables, 400).astype(np.int32)
    y = rng.integers(-6, 7, 400).astype(np.int32)
    y[::50] = -(10**7)
    parts = [(z, zidx, FP_TABLES), (y, yidx, MSHP_TABLES)]
    return CODER.encode_stream(parts), parts


def _stream_or_error(blob: bytes, parts: list) -> list[np.ndarray] | None:
    try:
        stream = CODER.decode_stream(blob)
        outs = [stream.next(i, t) for _, i, t in parts]
        stream.finish()
    except PacketError:
        return None
    assert [o.shape for o in outs] == [(s.size,) for s, _, _ in parts]
    return outs


def test_every_stream_truncation_and_extension_is_rejected():
    blob, parts = _good_stream()
    for cut in range(len(blob)):
        assert _stream_or_error(blob[:cut], parts) is None, cut
    for extra in (b"\x00", b"\x01\x02\x03\x04", b"\xff" * 9):
        assert _stream_or_error(blob + extra, parts) is None
        assert _stream_or_error(extra + blob, parts) is None


def _escape_region(blob: bytes, parts: list) -> range:
    """Where a one-state stream's escapes lie: after the header byte and the final state, before the words."""
    from splitbits.runtime.codec.tables import zigzag_encode

    start = 1 + 3 + (blob[0] >> 3)
    escaped = [s[t.values(s, i)[1]] for s, i, t in parts]
    return range(start, start + len(zigzag_encode(np.concatenate(escaped))))


def test_stream_cursors_must_meet():
    """A byte between the escapes and the words (both intact) is a stream whose cursors do not meet."""
    blob, parts = _good_stream()
    end = _escape_region(blob, parts).stop
    stream = CODER.decode_stream(blob[:end] + b"\x00" + blob[end:])
    for _, i, t in parts:
        stream.next(i, t)
    with pytest.raises(PacketError, match="do not meet"):
        stream.finish()


def test_stream_single_bit_flips_never_crash_and_rans_flips_are_caught():
    blob, parts = _good_stream(1)
    escapes = _escape_region(blob, parts)  # raw values: the packet CRC guards them
    assert len(escapes) > 20
    silent = rans = 0
    for i in range(len(blob)):
        for bit in range(8):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            out = _stream_or_error(bytes(bad), parts)
            if i not in escapes:
                rans += 1
                silent += out is not None and not all(np.array_equal(o, s) for o, (s, _, _) in zip(out, parts))
    assert silent <= 0.01 * rans  # rANS's final-state check catches (almost) every flip


@pytest.mark.parametrize("header", [bytes([6]), bytes([0x40]), bytes([0x80]), bytes([5 << 3]), b""])
def test_invalid_header_bytes(header):
    blob, index, _ = _good(50)
    assert _decode_or_error(header + blob[1:], index, MSHP_TABLES) is None


def test_state_below_L_and_overlong_escape_are_rejected():
    index = np.zeros(4, np.int32)
    # lanes 0, 3-byte state of value 1 (< L)
    assert _decode_or_error(bytes([0, 1, 0, 0]), index, FP_TABLES) is None
    blob = CODER.encode(np.full(4, 10**6, np.int32), index, FP_TABLES)
    esc_start = len(blob) - 4 * 3  # zigzag(10**6) takes 3 varint bytes; 4 escapes end the blob
    over = blob[:esc_start] + b"\xff" * 5 + b"\x7f" + blob[esc_start + 3:]
    assert _decode_or_error(over, index, FP_TABLES) is None
    outside = blob[:esc_start] + b"\xff\xff\xff\xff\x7f" + blob[esc_start + 3:]  # 2**35 - 1 > int32 zigzag
    assert _decode_or_error(outside, index, FP_TABLES) is None


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=300), n=st.integers(0, 500), family=st.sampled_from(["fp", "mshp"]))
def test_random_bytes_never_crash(junk, n, family):
    tables = FP_TABLES if family == "fp" else MSHP_TABLES
    _decode_or_error(junk, (np.arange(n) % tables.num_tables).astype(np.int32), tables)


def test_huge_hostile_blob_is_bounded_by_the_latent_size():
    """The work and the output are bounded by the bundle's shape, not by the blob."""
    rng = np.random.default_rng(7)
    junk = bytes([0]) + rng.integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    assert _decode_or_error(junk, np.zeros(3, np.int32), FP_TABLES) is None


# ---------------------------------------------------------------------------------------------
# JIT: cached on disk, warmed by `splitbits warmup`
# ---------------------------------------------------------------------------------------------


def test_kernels_are_cached_on_disk():
    from numba.core.caching import NullCache

    assert {nc._encode_kernel, nc._decode_kernel, nc._stream_kernel, nc._bucket_table} <= set(nc.KERNELS)
    for kernel in nc.KERNELS:
        assert not isinstance(kernel._cache, NullCache), kernel


WARM_CHECK = """
import numpy as np
from splitbits.runtime.codec import CdfTables, numba_coder as nc
from splitbits.runtime.quant import channel_index
coder = nc.NumbaCoder()
coder.warmup()
before = [len(k.signatures) for k in nc.KERNELS]
cdf = np.array([[0, 100, 65000, 65536, 0], [0, 1, 2, 3, 65536]], np.int32)
tables = CdfTables.create(cdf, np.array([4, 5]), np.array([-1, 0]))
z = np.arange(-3, 3, dtype=np.int32).reshape(2, 1, 3)
zidx = np.ascontiguousarray(channel_index(z.shape)).reshape(-1)
idx = np.ones((2, 1, 3), np.int64)  # the hyper path's output: any integer array
y = np.array([5, -2**31, 0, 1, 2, 3], np.int32).reshape(2, 1, 3)
for parts in ([(z, zidx, tables), (y, idx, tables)], [(y, idx, tables)]):
    blob = coder.encode_stream(parts)
    for data in (blob, memoryview(blob), memoryview(bytearray(blob))[0:len(blob)]):
        s = coder.decode_stream(data)
        for _, index, t in parts:
            s.next(index, t)
        s.finish()
print(before == [len(k.signatures) for k in nc.KERNELS], before)
"""


def test_warmup_compiles_every_kernel_the_stream_api_uses():
    """In a fresh process, after warmup() the production calls (streams from bytes or views of received
    buffers, int64 or int32 indexes) compile nothing more: the first packet does not wait for the JIT."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", WARM_CHECK], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("True"), out.stdout


def test_warmup_command_warms_numba(capsys):
    from splitbits.runtime.commands import run_warmup

    assert run_warmup(argparse.Namespace(coder="numba", bundle=None, backend="auto")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["numba"].endswith("ms")


def test_tables_of_a_real_bundle_roundtrip(tiny_bundles):
    from splitbits.runtime.bundle import load_bundle

    c = load_bundle(tiny_bundles["mshp"]).codec
    rng = np.random.default_rng(0)
    for tables in (c.z_tables, c.y_tables):
        index = rng.integers(0, tables.num_tables, 5000).astype(np.int32)
        symbols = rng.integers(-60, 60, 5000).astype(np.int32)
        np.testing.assert_array_equal(CODER.decode(CODER.encode(symbols, index, tables), index, tables), symbols)
