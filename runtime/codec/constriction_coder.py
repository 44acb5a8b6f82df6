"""Range coder on constriction: one ``Categorical`` model per CDF table, symbols grouped by table.

Blob layout: ``varint(len(main)) | main (little-endian uint32 words) | escapes (zigzag varints)``.
Symbols are coded table by table (stable order of the table index), which both sides derive from
the index array, so one ``encode`` call per table used — no per-symbol Python.
"""

from __future__ import annotations

import numpy as np

from splitbits.runtime.codec.base import EntropyCoder
from splitbits.runtime.codec.tables import (
    CdfTables,
    check_index,
    decode_varint,
    encode_varint,
    zigzag_decode,
    zigzag_encode,
)
from splitbits.runtime.errors import PacketError


def _import_constriction():
    try:
        import constriction
    except ImportError as exc:  # pragma: no cover - depends on the platform's wheels
        raise ImportError(
            "the constriction coder needs the 'constriction' package (no aarch64 wheel: use the numba coder)"
        ) from exc
    return constriction


class ConstrictionCoder(EntropyCoder):
    coder_id = 1
    name = "constriction"

    def __init__(self) -> None:
        self._cs = _import_constriction()
        self._models: dict[int, tuple[CdfTables, list]] = {}

    def _table_models(self, tables: CdfTables) -> list:
        cached = self._models.get(id(tables))
        if cached is not None and cached[0] is tables:
            return cached[1]
        cat = self._cs.stream.model.Categorical
        scale = float(1 << tables.precision)
        models = [cat(tables.pmf(t) / scale, perfect=False) for t in range(tables.num_tables)]
        self._models[id(tables)] = (tables, models)
        return models

    @staticmethod
    def _groups(index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        order = np.argsort(index, kind="stable")
        used, counts = np.unique(index[order], return_counts=True)
        return order, used, counts

    def encode(self, symbols: np.ndarray, index: np.ndarray, tables: CdfTables) -> bytes:
        symbols = np.asarray(symbols).reshape(-1)
        index = check_index(index, tables)
        if symbols.size != index.size:
            raise ValueError("symbols and index differ in size")
        models = self._table_models(tables)
        order, used, counts = self._groups(index)
        values, escaped = tables.values(symbols[order], index[order])
        values = values.astype(np.int32)
        enc = self._cs.stream.queue.RangeEncoder()
        start = 0
        for t, n in zip(used.tolist(), counts.tolist()):
            enc.encode(values[start:start + n], models[t])
            start += n
        main = enc.get_compressed().astype("<u4").tobytes()
        return encode_varint(len(main)) + main + zigzag_encode(symbols[order][escaped])

    def decode(self, blob: bytes | memoryview, index: np.ndarray, tables: CdfTables) -> np.ndarray:
        index = check_index(index, tables)
        blob = memoryview(blob)
        main_len, pos = decode_varint(blob)
        if main_len % 4 or pos + main_len > len(blob):
            raise PacketError("constriction blob: bad main stream length")
        words = np.frombuffer(blob[pos:pos + main_len], dtype="<u4").astype(np.uint32)
        models = self._table_models(tables)
        order, used, counts = self._groups(index)
        dec = self._cs.stream.queue.RangeDecoder(words)
        parts = []
        try:
            for t, n in zip(used.tolist(), counts.tolist()):
                parts.append(dec.decode(models[t], n))
        except (AssertionError, ValueError, RuntimeError) as exc:
            raise PacketError(f"constriction blob: invalid compressed data ({exc})") from exc
        values = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        sorted_index = index[order]
        esc_value = tables.length[sorted_index] - 2
        escaped = values == esc_value
        out_sorted = values + tables.offset[sorted_index]
        n_esc = int(escaped.sum())
        esc, used_bytes = zigzag_decode(blob[pos + main_len:], n_esc)
        if pos + main_len + used_bytes != len(blob):
            raise PacketError("constriction blob: trailing bytes after the escape stream")
        if n_esc:
            if (esc < np.iinfo(np.int32).min).any() or (esc > np.iinfo(np.int32).max).any():
                raise PacketError("escape value outside int32")
            out_sorted[escaped] = esc
        out = np.empty(index.size, dtype=np.int32)
        out[order] = out_sorted
        return out
