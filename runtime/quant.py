"""Quantisation exactly as CompressAI does it, in float32 numpy (round half to even).

FP:   s = round(y − median_c)         ŷ = s + median_c
MSHP: s = round(y − means)            ŷ = s + means
      idx = #{t < T−1 : table[t] < max(scale, bound)}   (CompressAI ``build_indexes``)
"""

from __future__ import annotations

import zlib

import numpy as np

from splitbits.runtime.errors import InputError

_I32 = np.iinfo(np.int32)


def quantize(values: np.ndarray, means: np.ndarray) -> np.ndarray:
    """``round(values − means)`` as int32; ``means`` broadcasts (per-channel medians or a full map).

    A value whose symbol would not fit int32 is an ``InputError`` (never clipped).
    """
    r = np.rint(np.asarray(values, dtype=np.float32) - np.asarray(means, dtype=np.float32))
    if not np.isfinite(r).all():
        raise InputError("latent holds NaN/Inf; refusing to quantise")
    if r.size and (r.min() < _I32.min or r.max() > _I32.max):
        raise InputError("latent symbol outside int32; refusing to quantise")
    return r.astype(np.int32)


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
    return zlib.crc32(data.tobytes()) & 0xFFFFFFFF
