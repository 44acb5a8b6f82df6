"""The entropy-coder interface: a whole latent per call, no per-symbol Python."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from splitbits.runtime.codec.tables import CdfTables


class EntropyCoder(ABC):
    """Lossless coder of int32 symbols, each with the index of the CDF table that models it.

    ``encode(symbols, index, tables)`` and ``decode(blob, index, tables)`` take flat (or any-shape)
    arrays of equal size; decode returns the symbols as a flat int32 array. A blob is self-delimited
    within its packet section; a hostile blob yields ``PacketError`` (or, at worst, wrong symbols
    that the packet checksums catch), never a crash, hang or unbounded allocation.
    """

    #: wire id in the packet header (never reuse a number)
    coder_id: int = 0
    name: str = ""

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
