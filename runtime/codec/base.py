"""The entropy-coder interface: a whole latent per call, no per-symbol Python."""

from __future__ import annotations

from abc import ABC, abstractmethod

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

    def warmup(self) -> None:  # noqa: B027 - optional hook, most coders need nothing
        """Compile or load whatever the first packet would otherwise wait for."""
