"""Range coder on constriction: one ``Categorical`` model per CDF table, symbols grouped by table.

Layouts: ``varint(n) | main (little-endian uint32 words) | escapes (zigzag varints)``, where
``n`` counts the main stream's bytes in a section blob (``encode``/``decode``, a version-1 packet's
sections) and its 32-bit words in a stream (``encode_stream``/``decode_stream``, a version-2
packet: one ``RangeEncoder`` over all parts, each part's escapes after the main stream in part
order). Within a part, symbols are coded table by table (stable order of the table index), which
both sides derive from the index array, so one ``encode`` call per table used — no per-symbol Python.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from splitbits.runtime.codec.base import EntropyCoder, Part, StreamDecoder
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


def _groups(index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(index, kind="stable")
    used, counts = np.unique(index[order], return_counts=True)
    return order, used, counts


class ConstrictionStream(StreamDecoder):
    """A blob being decoded part by part: the range decoder over the main words, a cursor in the escapes."""

    def __init__(self, coder: ConstrictionCoder, blob: bytes | memoryview, words: bool) -> None:
        self._coder = coder
        self._blob = memoryview(blob).cast("B")
        n, pos = decode_varint(self._blob)
        main_len = 4 * n if words else n
        if main_len % 4 or pos + main_len > len(self._blob):
            raise PacketError("constriction blob: bad main stream length")
        words_arr = np.frombuffer(self._blob[pos:pos + main_len], dtype="<u4").astype(np.uint32)
        self._dec = coder._cs.stream.queue.RangeDecoder(words_arr)
        self._esc = pos + main_len
        self._words = words
        self._parts = 0
        self._failed = False

    def next(self, index: np.ndarray, tables: CdfTables) -> np.ndarray:
        if self._failed:
            raise PacketError("constriction blob: a part requested after an error")
        self._failed = True  # until this part has decoded
        index = check_index(index, tables)
        models = self._coder._table_models(tables)
        order, used, counts = _groups(index)
        parts = []
        try:
            for t, n in zip(used.tolist(), counts.tolist()):
                parts.append(self._dec.decode(models[t], n))
        except (AssertionError, ValueError, RuntimeError) as exc:
            raise PacketError(f"constriction blob: invalid compressed data ({exc})") from exc
        values = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        sorted_index = index[order]
        escaped = values == tables.length[sorted_index] - 2
        out_sorted = values + tables.offset[sorted_index]
        n_esc = int(escaped.sum())
        esc, used_bytes = zigzag_decode(self._blob[self._esc:], n_esc)
        if n_esc:
            if (esc < np.iinfo(np.int32).min).any() or (esc > np.iinfo(np.int32).max).any():
                raise PacketError("escape value outside int32")
            out_sorted[escaped] = esc
        self._esc += used_bytes
        out = np.empty(index.size, dtype=np.int32)
        out[order] = out_sorted
        self._failed = False
        self._parts += 1
        return out

    def finish(self) -> None:
        if self._failed or not self._parts:
            raise PacketError("constriction blob: finished after an error, or before any part")
        if self._esc != len(self._blob):
            raise PacketError("constriction blob: trailing bytes after the escape stream")
        if self._words and not self._dec.maybe_exhausted():  # (a stream only: sections are read as in v1)
            raise PacketError("constriction blob: main stream words left over")


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

    def _encode_parts(self, parts: Sequence[Part]) -> tuple[bytes, bytes]:
        """(main stream, escapes) of the parts coded in order by one range encoder."""
        enc = self._cs.stream.queue.RangeEncoder()
        escapes = []
        for symbols, index, tables in parts:
            symbols = np.asarray(symbols).reshape(-1)
            index = check_index(index, tables)
            if symbols.size != index.size:
                raise ValueError("symbols and index differ in size")
            models = self._table_models(tables)
            order, used, counts = _groups(index)
            values, escaped = tables.values(symbols[order], index[order])
            values = values.astype(np.int32)
            start = 0
            for t, n in zip(used.tolist(), counts.tolist()):
                enc.encode(values[start:start + n], models[t])
                start += n
            escapes.append(zigzag_encode(symbols[order][escaped]))
        return enc.get_compressed().astype("<u4").tobytes(), b"".join(escapes)

    def encode_stream(self, parts: Sequence[Part]) -> bytes:
        if not parts:
            raise ValueError("a stream needs at least one part")
        main, escapes = self._encode_parts(parts)
        return encode_varint(len(main) // 4) + main + escapes

    def decode_stream(self, blob: bytes | memoryview) -> ConstrictionStream:
        return ConstrictionStream(self, blob, words=True)

    def encode(self, symbols: np.ndarray, index: np.ndarray, tables: CdfTables) -> bytes:
        main, escapes = self._encode_parts([(symbols, index, tables)])
        return encode_varint(len(main)) + main + escapes

    def decode(self, blob: bytes | memoryview, index: np.ndarray, tables: CdfTables) -> np.ndarray:
        stream = ConstrictionStream(self, blob, words=False)
        out = stream.next(index, tables)
        stream.finish()
        return out
