"""The splitbits runtime: what runs on the edge device and the server, without torch.

The public API in one import::

    from splitbits.runtime import EdgeEncoder, ServerDecoder, load_bundle

    enc = EdgeEncoder("runs/demo/bundle_mshp", "onnxruntime")   # head + entropy coder
    dec = ServerDecoder("runs/demo/bundle_mshp", "onnxruntime")  # packet parser + decoder + tail
    logits = dec.decode(enc.encode(image))                      # image: uint8 H×W×3

The names are imported on first use (``splitbits --help`` loads this package and must stay free
of numpy); the errors are plain exceptions, imported at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from splitbits.runtime.errors import (
    BackendError,
    BundleError,
    IndexMismatchError,
    InputError,
    PacketError,
    SplitbitsError,
    VerificationError,
    VersionError,
    WrongBundleError,
)

if TYPE_CHECKING:
    from splitbits.runtime.backends import get_backend
    from splitbits.runtime.bundle import Bundle, load_bundle
    from splitbits.runtime.codec import get_coder
    from splitbits.runtime.inputs import load_inputs
    from splitbits.runtime.pipeline import DecodeResult, EdgeEncoder, EncodeResult, ServerDecoder
    from splitbits.runtime.verify import VerifyReport, verify_backend, verify_bundle

#: public name -> the module that defines it (imported on first use)
_LAZY = {
    "EdgeEncoder": "splitbits.runtime.pipeline",
    "ServerDecoder": "splitbits.runtime.pipeline",
    "EncodeResult": "splitbits.runtime.pipeline",
    "DecodeResult": "splitbits.runtime.pipeline",
    "Bundle": "splitbits.runtime.bundle",
    "load_bundle": "splitbits.runtime.bundle",
    "get_backend": "splitbits.runtime.backends",
    "get_coder": "splitbits.runtime.codec",
    "load_inputs": "splitbits.runtime.inputs",
    "verify_backend": "splitbits.runtime.verify",
    "verify_bundle": "splitbits.runtime.verify",
    "VerifyReport": "splitbits.runtime.verify",
}

__all__ = [
    "BackendError",
    "Bundle",
    "BundleError",
    "DecodeResult",
    "EdgeEncoder",
    "EncodeResult",
    "IndexMismatchError",
    "InputError",
    "PacketError",
    "ServerDecoder",
    "SplitbitsError",
    "VerificationError",
    "VerifyReport",
    "VersionError",
    "WrongBundleError",
    "get_backend",
    "get_coder",
    "load_bundle",
    "load_inputs",
    "verify_backend",
    "verify_bundle",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
