"""The integer hyper graph is exact: the bound ``M + |b| (+ 2^(s−1)) ≤ 2²⁴`` of ``runtime.hyper_int``
is what ``load`` checks, every parameter file breaking it is refused, and ONNX Runtime's CPU graph
(GEMM, direct NCHWc and col2im convolutions, at every graph optimisation level and thread count)
reproduces the int64 reference bit for bit up to the bound — and provably not beyond it.

Synthetic parameters (no model export): fast, and they sit exactly at the bound, where a real
model's calibrated parameters never are.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitbits.runtime.errors import BundleError
from splitbits.runtime.hyper_int import (
    EXACT,
    FORMAT_VERSION,
    MAX_CLIP,
    SLOPE_BITS,
    IntHyperParams,
    IntHyperSession,
    IntLayer,
    check_layer,
    leaky,
)
from splitbits.runtime.quant import scale_indexes
from splitbits.runtime.scale_index import ScaleIndex

LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
# (transposed, cin, cout, k, stride, padding): the MSHP h_s geometry, small
MSHP = [(True, 4, 4, 5, 2, 1), (True, 4, 6, 5, 2, 1), (False, 6, 8, 5, 1, 0)]
TABLE = np.exp(np.linspace(np.log(0.11), np.log(256.0), 64)).astype(np.float32)


def _params(layers: list[IntLayer], in_shape: tuple[int, int, int], z_clip: tuple[int, int]) -> IntHyperParams:
    """``layers`` as a validated parameter set (through ``to_arrays``/``from_arrays``, as a file would be)."""
    shape = in_shape
    for la in layers:
        shape = (la.cout, *la.out_hw(*shape[1:]))
    specs = [{"transposed": la.transposed, "stride": la.stride, "padding": la.padding,
              **({} if la.last else {"slope": la.slope})} for la in layers]
    meta = {"format_version": FORMAT_VERSION, "layers": specs, "in_shape": list(in_shape),
            "out_shape": [shape[0] // 2, *shape[1:]], "z_clip": list(z_clip)}
    raw = IntHyperParams(tuple(layers), in_shape, (shape[0] // 2, *shape[1:]), z_clip, meta)
    return IntHyperParams.from_arrays(raw.to_arrays(), meta)


def _tight(seed: int, z_clip: tuple[int, int] = (-30, 30), shift: int = 9, slope: int = 41) -> IntHyperParams:
    """Random MSHP-shaped parameters with every channel's weights scaled to sit just below the bound."""
    rng = np.random.default_rng(seed)
    in_shape = (4, 3, 3)
    lo, hi = np.full(4, z_clip[0], np.int64), np.full(4, z_clip[1], np.int64)
    shape, layers = in_shape, []
    for i, (transposed, cin, cout, k, stride, pad) in enumerate(MSHP):
        last = i == len(MSHP) - 1
        w = rng.integers(-50, 51, (cin, cout, k, k) if transposed else (cout, cin, k, k))
        z = np.zeros(cout, np.int64)
        probe = IntLayer(transposed, w, stride, pad, z, z, None, 0)
        hw = probe.out_hw(*shape[1:])
        bias = rng.integers(-3000, 3000, (cout, *hw) if i == 0 else (cout,))
        extra = np.abs(bias).reshape(cout, -1).max(axis=1) + (0 if last else 1 << (shift - 1))
        t = (EXACT - extra) // np.maximum(probe.bound(lo, hi), 1)
        w = w * t.reshape((1, -1, 1, 1) if transposed else (-1, 1, 1, 1))
        layer = IntLayer(transposed, w, stride, pad, bias, np.full(cout, 20 if last else shift),
                         None if last else rng.integers(200, 2000, cout), 0 if last else slope)
        lo, hi = check_layer(layer, i, lo, hi)
        layers.append(layer)
        shape = (cout, *hw)
    return _params(layers, in_shape, z_clip)


def _int64_reference(params: IntHyperParams, z: np.ndarray) -> np.ndarray:
    """The integer function with int64 einsums only (no BLAS, no float): what both must equal."""
    a = np.clip(z.astype(np.int64), *params.z_clip)
    for layer in params.layers:
        w, k, s, p = layer.weight, layer.k, layer.stride, layer.padding
        _, h, wd = a.shape
        ho, wo = layer.out_hw(h, wd)
        if layer.transposed:
            full = np.zeros((layer.cout, (h - 1) * s + k, (wd - 1) * s + k), np.int64)
            for ky in range(k):
                for kx in range(k):
                    full[:, ky:ky + (h - 1) * s + 1:s, kx:kx + (wd - 1) * s + 1:s] += np.einsum(
                        "io,ihw->ohw", w[:, :, ky, kx], a)
            acc = full[:, p:p + ho, p:p + wo]
        else:
            ap = np.pad(a, ((0, 0), (p, p), (p, p)))
            acc = np.zeros((layer.cout, ho, wo), np.int64)
            for ky in range(k):
                for kx in range(k):
                    acc += np.einsum("oi,ihw->ohw", w[:, :, ky, kx],
                                     ap[:, ky:ky + (ho - 1) * s + 1:s, kx:kx + (wo - 1) * s + 1:s])
        acc = acc + (layer.bias if layer.bias.ndim == 3 else layer.bias.reshape(-1, 1, 1))
        if layer.last:
            return acc
        r = np.minimum((acc + (1 << (layer.shift.reshape(-1, 1, 1) - 1))) >> layer.shift.reshape(-1, 1, 1),
                       layer.clip.reshape(-1, 1, 1))
        a = np.where(r < 0, leaky(r, layer.slope), r)
    raise AssertionError


def _graph_out(params: IntHyperParams, z: np.ndarray, level: str = "all", threads: int = 1) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(params.graph(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"z_symbols": np.asarray(z, np.int32)[None]})[0][0]


def _exact(params: IntHyperParams, z: np.ndarray) -> np.ndarray:
    """The reference's outputs (accumulator · 2^−G) as float32 bit patterns."""
    acc = _int64_reference(params, z)
    out = np.ldexp(acc.astype(np.float64), -params.layers[-1].shift.reshape(-1, 1, 1))
    assert np.array_equal(out.astype(np.float32).astype(np.float64), out)  # representable: the bound at work
    return out.astype(np.float32).view(np.uint32)


def _cases(params: IntHyperParams, rng: np.random.Generator) -> list[np.ndarray]:
    lo, hi = params.z_clip
    shape = params.in_shape
    return [rng.integers(lo, hi + 1, shape), rng.choice([lo, hi], shape), np.full(shape, hi), np.full(shape, lo),
            rng.integers(-(2**31), 2**31 - 1, shape), rng.choice([lo, hi, 0], shape)]


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_graph_at_the_bound_equals_the_int64_reference_at_every_optimisation_level(level):
    for seed in range(3):
        params = _tight(seed)
        for z in _cases(params, np.random.default_rng(seed)):
            np.testing.assert_array_equal(_graph_out(params, z, level).view(np.uint32), _exact(params, z))


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_graph_does_not_depend_on_the_thread_count(threads):
    """More threads split the GEMMs differently (another summation order): the same bits."""
    params = _tight(7)
    for z in _cases(params, np.random.default_rng(7)):
        np.testing.assert_array_equal(_graph_out(params, z, "all", threads).view(np.uint32), _exact(params, z))


def test_numpy_reference_equals_the_int64_einsum_reference():
    params = _tight(3)
    for z in _cases(params, np.random.default_rng(3)):
        np.testing.assert_array_equal(params.accumulate(np.asarray(z, np.int32)), _int64_reference(params, z))


def _one_conv(weight: np.ndarray, transposed: bool, stride: int, pad: int, z_hi: int) -> IntHyperParams:
    """One layer (also the last) over z in [−z_hi, z_hi], not validated (may break the bound)."""
    cin = weight.shape[0 if transposed else 1]
    cout = weight.shape[1 if transposed else 0]
    layer = IntLayer(transposed, weight, stride, pad, np.zeros((cout, 1, 1), np.int64), np.zeros(cout, np.int64),
                     None, 0)
    in_shape = (cin, 6, 6)
    out = (cout, *layer.out_hw(6, 6))
    layer = IntLayer(transposed, weight, stride, pad, np.zeros(out, np.int64), np.zeros(cout, np.int64), None, 0)
    meta = {"format_version": FORMAT_VERSION, "layers": [{"transposed": transposed, "stride": stride,
                                                          "padding": pad}],
            "in_shape": list(in_shape), "out_shape": [cout // 2, *out[1:]], "z_clip": [-z_hi, z_hi]}
    return IntHyperParams((layer,), in_shape, (cout // 2, *out[1:]), (-z_hi, z_hi), meta)


def _positive_weights(rng: np.random.Generator, shape: tuple[int, ...], total: int) -> np.ndarray:
    """Positive integer weights whose per-output-channel sum (axis 0 is the output) is ``total``."""
    w = rng.integers(1, 60, shape).astype(np.int64)
    w[:, 0, 0, 0] += total - w.reshape(shape[0], -1).sum(axis=1)
    assert (w > 0).all()
    return w


@pytest.mark.parametrize("over", [0, 2])
def test_conv_sum_at_2_24_is_exact_and_beyond_is_refused_and_would_round(over):
    """All-positive weights, every input at the clip: an interior output is exactly the bound M. At
    M = 2²⁴ − 1 the graph is exact; at M = 2²⁴ + 509 (odd, so no float32) ``load`` refuses the file, and
    the graph built anyway cannot give the exact sum, whatever its summation order."""
    z_hi = 255
    total = EXACT // z_hi + over  # 255 · 65793 = 2**24 − 1
    w = _positive_weights(np.random.default_rng(0), (2, 4, 3, 3), total)
    params = _one_conv(w, False, 1, 1, z_hi)
    m = params.layers[0].bound(np.full(4, -z_hi), np.full(4, z_hi))
    np.testing.assert_array_equal(m, z_hi * total)
    z = np.full(params.in_shape, z_hi)
    got = _graph_out(params, z).astype(np.float64)
    want = params.accumulate(z.astype(np.int32)).astype(np.float64)
    assert want.max() == z_hi * total
    if not over:
        np.testing.assert_array_equal(got, want)
        _params(list(params.layers), params.in_shape, params.z_clip)  # validates
    else:
        assert want.max() > EXACT and int(want.max()) % 2 == 1
        assert not np.array_equal(got, want)  # the bound is necessary, not just sufficient
        with pytest.raises(ValueError, match="2\\*\\*24"):
            _params(list(params.layers), params.in_shape, params.z_clip)


def test_conv_transpose_bound_is_per_stride_phase_and_col2im_is_exact_there():
    """A stride-2 transposed convolution: an output sees one phase's taps (9 of 25 for k = 5), which is
    what the bound sums; with that phase's sum at 2²⁴ the col2im additions stay exact, though the whole
    kernel's L1 norm is far beyond 2²⁴."""
    rng = np.random.default_rng(1)
    z_hi = 256
    w = rng.integers(1, 40, (3, 2, 5, 5)).astype(np.int64)  # [cin, cout, k, k]
    phase = w[:, :, ::2, ::2].sum(axis=(0, 2, 3))  # the (0, 0) phase: taps 0, 2, 4
    w[0, :, 0, 0] += EXACT // z_hi - phase  # that phase sums to exactly 2**24 / z_hi per output channel
    params = _one_conv(w, True, 2, 1, z_hi)
    assert (np.abs(w).sum(axis=(0, 2, 3)) * z_hi > EXACT).all()  # the whole kernel's L1 would refuse it
    np.testing.assert_array_equal(params.layers[0].bound(np.full(3, -z_hi), np.full(3, z_hi)), EXACT)
    _params(list(params.layers), params.in_shape, params.z_clip)  # validates at exactly the bound
    for z in (np.full(params.in_shape, z_hi), np.full(params.in_shape, -z_hi)):
        want = params.accumulate(z.astype(np.int32))
        assert np.abs(want).max() == EXACT
        for level in LEVELS:
            np.testing.assert_array_equal(_graph_out(params, z, level).astype(np.float64), want)


# ---------------------------------------------------------------------------------------------
# hostile parameter files
# ---------------------------------------------------------------------------------------------


def _damaged(kind: str) -> tuple[dict, dict]:
    params = _tight(11)
    arrays = params.to_arrays()
    meta = dict(params.meta)
    if kind == "bound-exceeded":  # one output channel of layer 1 doubled: twice a bound that was tight
        w = arrays["w1"].astype(np.int64)
        w[:, 0] *= 2
        arrays["w1"] = w.astype(np.int32)
    elif kind == "weight-too-large":
        arrays["w2"] = arrays["w2"].astype(np.int64)
        arrays["w2"].flat[0] = EXACT + 1
    elif kind == "shift-zero":
        arrays["shift0"] = np.zeros_like(arrays["shift0"])
    elif kind == "clip-zero":
        arrays["clip1"] = np.zeros_like(arrays["clip1"])
    elif kind == "clip-too-large":
        arrays["clip1"] = np.full_like(arrays["clip1"], MAX_CLIP + 1)
    elif kind == "slope-one":
        meta["layers"] = [dict(s) for s in meta["layers"]]
        meta["layers"][0]["slope"] = 1 << SLOPE_BITS
    elif kind == "leaky-product":  # a tiny shift: r_min·slope beyond 2**24
        meta["layers"] = [dict(s) for s in meta["layers"]]
        meta["layers"][0]["slope"] = (1 << SLOPE_BITS) - 1
        arrays["shift0"] = np.ones_like(arrays["shift0"])
    elif kind == "bias-map-shape":
        arrays["b0"] = arrays["b0"][:, :-1]
    elif kind == "float-weights":
        arrays["w0"] = arrays["w0"].astype(np.float32)
    elif kind == "z-clip":
        meta["z_clip"] = [3, 40]
    elif kind == "old-format":
        meta["format_version"] = 1
    return arrays, meta


@pytest.mark.parametrize("kind", ["bound-exceeded", "weight-too-large", "shift-zero", "clip-zero", "clip-too-large",
                                  "slope-one", "leaky-product", "bias-map-shape", "float-weights", "z-clip",
                                  "old-format"])
def test_each_broken_bound_or_shape_is_refused(kind, tmp_path):
    arrays, meta = _damaged(kind)
    path = tmp_path / "hyper_int.npz"
    np.savez(path, **{**arrays, "meta": np.array(json.dumps(meta))})
    with pytest.raises(BundleError, match="re-export" if kind == "old-format" else "invalid"):
        IntHyperParams.load(path)


def test_the_undamaged_file_loads(tmp_path):
    """The control for the test above: the same file, undamaged, loads."""
    arrays, _ = _damaged("none")
    path = tmp_path / "hyper_int.npz"
    np.savez(path, **arrays)
    assert IntHyperParams.load(path).graph() == _tight(11).graph()


def test_a_graph_that_is_not_the_parameters_graph_is_refused():
    params, other = _tight(0), _tight(1)
    IntHyperSession(params, params.graph(), TABLE, 0.11)
    with pytest.raises(BundleError, match="not the graph"):
        IntHyperSession(params, other.graph(), TABLE, 0.11)


def test_graph_bytes_are_deterministic_valid_onnx():
    onnx = pytest.importorskip("onnx")
    g = _tight(5).graph()
    assert g == _tight(5).graph()
    onnx.checker.check_model(onnx.load_from_string(g), full_check=True)


# ---------------------------------------------------------------------------------------------
# the scale-index lookup
# ---------------------------------------------------------------------------------------------


def _specials(table: np.ndarray, bound: np.float32) -> np.ndarray:
    t = table[:-1]
    near = np.concatenate([t, np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(0))])
    return np.concatenate([near, np.array([0.0, -0.0, -1.0, bound, np.nextafter(bound, np.float32(0)),
                                           np.float32(np.inf), np.float32(-np.inf), 3e38, 1e-30], np.float32)])


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(2, 80), st.floats(1e-3, 10.0), st.floats(1.01, 3.0), st.floats(0.01, 5.0),
       st.integers(0, 2**31 - 1))
def test_scale_index_lookup_equals_searchsorted(n, start, ratio, bound, seed):
    table = (start * ratio ** np.arange(n)).astype(np.float32)
    if not (np.isfinite(table).all() and (np.diff(table) > 0).all()):
        return
    bound = np.float32(bound)
    rng = np.random.default_rng(seed)
    scales = np.concatenate([_specials(table, bound),
                             (rng.standard_normal(500) * np.exp(rng.uniform(-8, 8, 500))).astype(np.float32)])
    np.testing.assert_array_equal(ScaleIndex(table, bound)(scales), scale_indexes(scales, table, bound))


def test_scale_index_refuses_a_table_it_cannot_bucket():
    with pytest.raises(BundleError):
        ScaleIndex(np.array([1.0, 1.0, 2.0], np.float32), 0.11)  # not increasing
    with pytest.raises(BundleError):
        ScaleIndex(np.array([1.0, np.nextafter(np.float32(1.0), np.float32(2)), 3e38, 3.1e38], np.float32), 0.11)
