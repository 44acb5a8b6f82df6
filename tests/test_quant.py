"""runtime.quant.quantize: the compiled one-pass kernel equals float32 numpy (CompressAI's rounding)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from splitbits.runtime.errors import InputError
from splitbits.runtime.quant import quantize


def _reference(values: np.ndarray, means: np.ndarray) -> np.ndarray:
    return np.rint(values.astype(np.float32) - means.astype(np.float32)).astype(np.int32)


_floats = st.one_of(st.floats(-1e6, 1e6, width=32), st.integers(-2000, 2000).map(lambda k: k / 2),
                    st.floats(-3e9, 3e9, width=32))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), shape=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)),
       per_channel=st.booleans())
def test_kernel_equals_float32_numpy(data, shape, per_channel):
    """Halves (ties to even), large and small values, per-channel and full-map means."""
    values = data.draw(hnp.arrays(np.float32, shape, elements=_floats))
    mshape = (shape[0], 1, 1) if per_channel else shape
    means = data.draw(hnp.arrays(np.float32, mshape, elements=st.integers(-4000, 4000).map(lambda k: k / 4)))
    ref = np.rint(values - means)
    if ref.size and (ref.min() < -(2**31) or ref.max() > 2**31 - 1):
        with pytest.raises(InputError, match="outside int32"):
            quantize(values, means)
        return
    got = quantize(values, means)
    assert got.dtype == np.int32 and np.array_equal(got, _reference(values, means))


def test_ties_round_to_even_and_refusals():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999998], np.float32).reshape(1, 2, 3)
    assert quantize(v, np.zeros((1, 1, 1), np.float32)).ravel().tolist() == [0, 2, 2, 0, -2, 2]
    for bad, why in ((np.nan, "NaN"), (np.inf, "NaN"), (3e9, "outside int32")):
        w = v.copy()
        w[0, 1, 2] = bad
        with pytest.raises(InputError, match=why):
            quantize(w, np.zeros((1, 1, 1), np.float32))


@pytest.mark.parametrize("case", ["batched", "float64", "strided", "broadcast-map"])
def test_other_layouts_take_the_numpy_path_with_the_same_result(case):
    rng = np.random.default_rng(0)
    v = rng.normal(0, 5, (2, 3, 4, 5)).astype(np.float32)
    m = rng.normal(0, 1, (3, 1, 1)).astype(np.float32)
    args = {"batched": (v, m), "float64": (v[0].astype(np.float64), m), "strided": (v[0, :, ::2], m),
            "broadcast-map": (v[0], m[:, :, 0][:, :, None] * np.ones((1, 4, 1), np.float32))}[case]
    assert np.array_equal(quantize(*args), _reference(*args))
