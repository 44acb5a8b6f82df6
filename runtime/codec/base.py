"""The entropy-coder interface: a whole latent (or a whole packet's stream) per call, no per-symbol Python."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from splitbits.runtime.codec.tables import CdfTables

#: one part of a stream: (symbols, table index per symbol, the tables they index)
Part = tuple[np.ndarray, np.ndarray, CdfTables]


class StreamDecoder(ABC):
    """Reads one stream part by part: ``next(index, tables)`` for each part in the encoder's order (the
    caller may compute a part's ``index`` from the parts before it: MSHP's y indexes come from z), then
    ``finish()``. Any defect is a ``PacketError``; after one, the decoder refuses every further call."""

    @abstractmethod
    def next(self, index: np.ndarray, tables: CdfTables) -> np.ndarray:
        """The next part's symbols (flat int32, ``index.size`` of them; the count never comes from the blob)."""

    @abstractmethod
    def finish(self) -> None:
        """The stream's integrity check: everything consumed exactly, the coder back at its initial state."""


class EntropyCoder(ABC):
    """Lossless coder of int32 symbols, each with the index of the CDF table that models it.

    Two blob formats. A *stream* (``encode_stream`` / ``decode_stream``; what a version-2 packet holds)
    codes several parts — MSHP's z then y, or FP's y alone — in one self-delimited blob whose parts are
    decoded in order, each after the caller knows its indexes. A *section blob* (``encode`` / ``decode``
    and the batch API; a version-1 packet's section format) codes one latent. Decoders treat blobs as
    hostile: a bad one yields ``PacketError`` (or, at worst, wrong symbols that the packet checksums
    catch), never a crash, hang or unbounded allocation.
    """

    #: wire id in the packet header (never reuse a number)
    coder_id: int = 0
    name: str = ""

    @abstractmethod
    def encode_stream(self, parts: Sequence[Part]) -> bytes:
        """One blob for all ``parts`` (at least one), decodable part by part in the same order."""

    @abstractmethod
    def decode_stream(self, blob: bytes | memoryview) -> StreamDecoder: ...

    @abstractmethod
    def encode(self, symbols: np.ndarray, index: np.ndarray, tables: CdfTables) -> bytes: ...

    @abstractmethod
    def decode(self, blob: bytes | memoryview, index: np.ndarray, tables: CdfTables) -> np.ndarray: ...

    def encode_batch(self, symbols: Sequence[np.ndarray], index: Sequence[np.ndarray],
                     tables: CdfTables) -> list[bytes]:
        """One blob per latent; coders override this to do the whole batch in one call."""
        if len(symbols) != len(index):
            raise ValueError("symbols and index lists differ in length")
        return [self.encode(s, i, tables) for s, i in zip(symbols, index)]

    def decode_batch(self, blobs: Sequence[bytes | memoryview], index: Sequence[np.ndarray],
                     tables: CdfTables) -> list[np.ndarray]:
        """The flat int32 symbols of each blob; coders override this to do the batch in one call."""
        if len(blobs) != len(index):
            raise ValueError("blobs and index lists differ in length")
        return [self.decode(b, i, tables) for b, i in zip(blobs, index)]

    def warmup(self) -> None:  # noqa: B027 - optional hook, most coders need nothing
        """Compile or load whatever the first packet would otherwise wait for."""
