"""Exceptions of the runtime; every one is a clear, catchable error, never a silent wrong tensor."""

from __future__ import annotations


class SplitbitsError(Exception):
    """Base class of all errors splitbits raises on purpose."""


class InputError(SplitbitsError, ValueError):
    """An image (or batch) of the wrong shape, dtype or value range, or with NaN/Inf."""


class BundleError(SplitbitsError):
    """A bundle that is missing, incomplete, tampered with or made by an incompatible version."""


class PacketError(SplitbitsError, ValueError):
    """Bytes that are not a valid packet for this bundle (truncated, corrupted, oversized, ...)."""


class WrongBundleError(PacketError):
    """A well-formed packet made for a different bundle (fingerprint mismatch)."""


class VersionError(PacketError):
    """A packet of an unsupported format version."""


class IndexMismatchError(PacketError):
    """The decoder's scale indexes differ from the encoder's (checksum mismatch): refusing to decode."""


class BackendError(SplitbitsError):
    """An inference backend that is unavailable or failed."""


class VerificationError(SplitbitsError):
    """Outputs that do not match the golden reference within tolerance."""
