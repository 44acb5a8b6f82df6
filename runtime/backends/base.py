"""The inference-backend interface: a backend loads a bundle graph into a session that maps named
numpy inputs to named numpy outputs (float32, NCHW, batch first)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from splitbits.runtime.bundle import Bundle


class Session(ABC):
    input_names: list[str]
    output_names: list[str]

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph; every output comes back as a numpy array keyed by name."""


class Backend(ABC):
    #: name used on the command line (``--backend``)
    name: str = ""

    @abstractmethod
    def load(self, bundle: Bundle, graph: str) -> Session:
        """A session for ``graph`` (``head``, ``hyper`` or ``tail``) of ``bundle``."""

    def describe(self) -> dict[str, str]:
        """Versions and devices, for reports."""
        return {"backend": self.name}
