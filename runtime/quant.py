"""Quantisation exactly as CompressAI does it, in float32 numpy (round half to even).

FP:   s = round(y − median_c)         ŷ = s + median_c
MSHP: s = round(y − means)            ŷ = s + means
      idx = #{t < T−1 : table[t] < max(scale, bound)}   (CompressAI ``build_indexes``)
"""

from __future__ import annotations

import zlib

import numpy as np
from numba import njit

from splitbits.runtime.errors import InputError

_I32 = np.iinfo(np.int32)
_NAN, _RANGE = 1, 2  # _quantize_chw's refusals


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_chw(values: np.ndarray, means: np.ndarray, per_channel: bool, out: np.ndarray
                  ) -> int:  # pragma: no cover - compiled
    """One pass over a C-contiguous float32 [C, H, W] latent: ``out = rint(values − means)`` with the
    difference rounded to float32 first (float64 holds it, so one rounding to float32 is float32's own
    subtraction); ``means`` [C] (``per_channel``) or [C, H, W]. Returns 0, or why it refused."""
    c, h, w = values.shape
    for i in range(c):
        for j in range(h):
            for k in range(w):
                m = means[i, 0, 0] if per_channel else means[i, j, k]
                d = np.float32(np.float64(values[i, j, k]) - np.float64(m))
                if not np.isfinite(d):
                    return _NAN
                r = np.rint(np.float64(d))
                if r < -2147483648.0 or r > 2147483647.0:
                    return _RANGE
                out[i, j, k] = np.int32(r)
    return 0


def quantize(values: np.ndarray, means: np.ndarray) -> np.ndarray:
    """``round(values − means)`` as int32 (float32 arithmetic, half to even, as CompressAI); ``means``
    broadcasts (per-channel medians or a full map).

    A value whose symbol would not fit int32 is an ``InputError`` (never clipped). One compiled pass
    for the edge's case (one float32 [C, H, W] latent); numpy for the rest.
    """
    v, m = np.asarray(values), np.asarray(means)
    if (v.ndim == 3 and v.dtype == np.float32 and v.flags.c_contiguous and m.dtype == np.float32
            and m.flags.c_contiguous and m.shape in ((v.shape[0], 1, 1), v.shape)):
        out = np.empty(v.shape, np.int32)
        why = _quantize_chw(v, m, m.shape != v.shape, out)
    else:
        r = np.rint(v.astype(np.float32, copy=False) - m.astype(np.float32, copy=False))
        if not np.isfinite(r).all():
            why = _NAN
        elif r.size and (r.min() < _I32.min or r.max() > _I32.max):
            why = _RANGE
        else:
            why, out = 0, r.astype(np.int32)
    if why == _NAN:
        raise InputError("latent holds NaN/Inf; refusing to quantise")
    if why == _RANGE:
        raise InputError("latent symbol outside int32; refusing to quantise")
    return out


def dequantize(symbols: np.ndarray, means: np.ndarray) -> np.ndarray:
    """``symbols + means`` in float32 (CompressAI ``dequantize``)."""
    return (symbols.astype(np.float32) + np.asarray(means, dtype=np.float32)).astype(np.float32)


def channel_means(medians: np.ndarray, ndim_spatial: int = 2) -> np.ndarray:
    """Per-channel medians shaped to broadcast over [C, H, W] (or [N, C, H, W])."""
    return np.asarray(medians, dtype=np.float32).reshape((-1,) + (1,) * ndim_spatial)


def channel_index(shape: tuple[int, ...]) -> np.ndarray:
    """Table index = channel, for a latent of shape [C, H, W] (FP and the z latent of MSHP)."""
    c = shape[0]
    return np.broadcast_to(np.arange(c, dtype=np.int32).reshape((c,) + (1,) * (len(shape) - 1)), shape)


def scale_indexes(scales: np.ndarray, scale_table: np.ndarray, scale_bound: float) -> np.ndarray:
    """CompressAI's ``GaussianConditional.build_indexes`` (bit-exact for the same float32 scales)."""
    s = np.maximum(np.asarray(scales, dtype=np.float32), np.float32(scale_bound))
    table = np.asarray(scale_table, dtype=np.float32)[:-1]
    return np.searchsorted(table, s, side="left").astype(np.int32)


def index_checksum(idx: np.ndarray) -> int:
    """CRC32 of the scale indexes (uint8 when they fit), carried in the packet header."""
    idx = np.ascontiguousarray(idx)
    data = idx.astype(np.uint8) if idx.size and idx.max() < 256 and idx.min() >= 0 else idx.astype("<i4")
    return zlib.crc32(data) & 0xFFFFFFFF  # the array's buffer, no copy
