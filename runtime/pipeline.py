"""Edge encoder and server decoder: image → packet → logits, with per-stage timings.

Edge (DESIGN.md data flow)::

    image ─► preprocess ─► head ─► y [, z]
    FP:   s = round(y − median_c)
    MSHP: sz = round(z − median_z); ẑ = sz + median_z; (scales, means) = hyper(ẑ); idx = index(scales)
          s = round(y − means)
    coder.encode(...) ─► packet

Server: parse ─► decode (MSHP: z, hyper(ẑ) again, idx checked against the packet's CRC) ─► ŷ ─► tail.

MSHP hyper paths: ``int`` (``splitbits.runtime.hyper_int``: an exact integer graph from the ẑ
symbols on ONNX Runtime's CPU provider, bit-identical on every platform; the default where the bundle
has ``hyper_int.npz``, flagged in the packet) or ``float`` (the backend's ``hyper.onnx``; may differ
by an ulp across devices, which the idx checksum turns into an ``IndexMismatchError``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from splitbits.runtime import packet as pkt
from splitbits.runtime.backends import Backend, Session, get_backend
from splitbits.runtime.bundle import Bundle, load_bundle
from splitbits.runtime.codec import CODERS, CdfTables, EntropyCoder, get_coder
from splitbits.runtime.errors import BundleError, IndexMismatchError, InputError
from splitbits.runtime.hyper_int import IntHyperParams, IntHyperSession
from splitbits.runtime.quant import (
    channel_index,
    channel_means,
    dequantize,
    index_checksum,
    quantize,
    scale_indexes,
)


class Timer:
    """Accumulates wall time per named stage (milliseconds)."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.ms[stage] = self.ms.get(stage, 0.0) + (now - self._t) * 1e3
        self._t = now


def _as_bundle(bundle: Bundle | str | Path) -> Bundle:
    return bundle if isinstance(bundle, Bundle) else load_bundle(bundle)


def _as_backend(backend: Backend | str, bundle: Bundle | None = None, **options: Any) -> Backend:
    return backend if isinstance(backend, Backend) else get_backend(backend, bundle=bundle, **options)


class FloatHyper:
    """Hyper-synthesis on the inference backend (float; may differ by an ulp across devices)."""

    flag = 0
    name = "float"

    def __init__(self, session: Session) -> None:
        self.session = session

    def __call__(self, z_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.session.run({"z_hat": z_hat})
        return out["scales"], out["means"]


class IntHyper:
    """The deterministic hyper path (``hyper_int.npz`` / ``hyper_int.onnx`` on ONNX Runtime's CPU
    provider, whatever the backend): identical integer results on every device."""

    flag = pkt.FLAG_INT_HYPER
    name = "int"

    def __init__(self, session: IntHyperSession) -> None:
        self.session = session

    @property
    def params(self) -> IntHyperParams:
        return self.session.params

    def index_means(self, z_symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.session.index_means(z_symbols)


HYPER_INT_FILE = "hyper_int.npz"
HYPER_INT_GRAPH = "hyper_int.onnx"


def has_int_hyper(bundle: Bundle) -> bool:
    return HYPER_INT_FILE in bundle.manifest.get("files", {})


def make_hyper(bundle: Bundle, backend: Backend | None, mode: str = "auto") -> FloatHyper | IntHyper:
    """The hyper path by name: ``int``, ``float`` or ``auto`` (``int`` where the bundle has it). The
    int path needs no backend; it runs on ONNX Runtime's CPU provider with the backend's thread count
    where it has one (``threads``), else ONNX Runtime's default."""
    if mode == "auto":
        mode = "int" if has_int_hyper(bundle) else "float"
    if mode == "float":
        if backend is None:
            raise ValueError("the float hyper path needs a backend")
        return FloatHyper(backend.load(bundle, "hyper"))
    if mode == "int":
        if not has_int_hyper(bundle):
            raise BundleError(f"bundle {bundle.path} has no {HYPER_INT_FILE} (re-export it, or use hyper='float')")
        params = IntHyperParams.load(bundle.file(HYPER_INT_FILE))
        if params.in_shape != bundle.latent_shape("z") or params.out_shape != bundle.latent_shape("y"):
            raise BundleError(f"{bundle.path}: {HYPER_INT_FILE} does not match the latent shapes")
        if HYPER_INT_GRAPH not in bundle.manifest["files"]:
            raise BundleError(f"{bundle.path}: {HYPER_INT_GRAPH} is not listed in the manifest (re-export the bundle)")
        graph = bundle.file(HYPER_INT_GRAPH).read_bytes()
        c = bundle.codec
        return IntHyper(IntHyperSession(params, graph, c.scale_table, c.scale_bound, getattr(backend, "threads", 0)))
    raise ValueError(f"unknown hyper path {mode!r}; available: auto, int, float")


def hyper_index_means(hyper: FloatHyper | IntHyper, z_symbols: np.ndarray, codec: Any
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(idx, means) of one image's ẑ symbols [Cz, Hz, Wz] on either hyper path."""
    if isinstance(hyper, IntHyper):
        return hyper.index_means(z_symbols)
    scales, means = hyper(dequantize(z_symbols, channel_means(codec.z_medians))[None])
    return scale_indexes(scales[0], codec.scale_table, codec.scale_bound), means[0]


def preprocess(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 HWC / NHWC or float CHW / NCHW in [0, 1] → float32 NCHW; anything else is an InputError."""
    if not isinstance(images, np.ndarray):
        raise InputError(f"expected a numpy array, got {type(images).__name__}")
    c, h, w = shape
    x = images
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1:] != (h, w, c):
            raise InputError(f"uint8 images must be HxWx{c} = {h}x{w}x{c} (or NxHxWx{c}); got {images.shape}")
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
    if x.dtype in (np.float32, np.float64):
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1:] != (c, h, w):
            raise InputError(f"float images must be {c}x{h}x{w} (or Nx{c}x{h}x{w}) in [0, 1]; got {images.shape}")
        if not np.isfinite(x).all():
            raise InputError("image holds NaN or Inf")
        if x.min() < 0.0 or x.max() > 1.0:
            raise InputError(f"float images must lie in [0, 1]; got [{x.min():.3g}, {x.max():.3g}]")
        return np.ascontiguousarray(x, dtype=np.float32)
    raise InputError(f"images must be uint8 (HWC) or float32 (CHW in [0, 1]); got dtype {x.dtype}")


@dataclass
class EncodeResult:
    packet: bytes
    symbols: dict[str, np.ndarray]
    idx: np.ndarray | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: per latent, the (table index, tables) its symbols were coded with
    coded_with: dict[str, tuple[np.ndarray, CdfTables]] = field(default_factory=dict, repr=False)

    @property
    def bytes(self) -> int:
        return len(self.packet)

    @cached_property
    def ideal_bits(self) -> dict[str, float]:
        """−Σlog₂p per latent under its tables (the likelihood estimate beside the real size), computed
        on first use: bookkeeping, not part of the edge's work or its timed stages."""
        return {k: tables.ideal_bits(self.symbols[k], index) for k, (index, tables) in self.coded_with.items()}


@lru_cache(maxsize=16)
def _channel_index(shape: tuple[int, ...]) -> np.ndarray:
    """The flat contiguous table index of a per-channel latent (FP's y, MSHP's z), built once per shape."""
    return np.ascontiguousarray(channel_index(shape), dtype=np.int32).reshape(-1)


class EdgeEncoder:
    """Runs the head on the edge and turns its latents into packets."""

    def __init__(self, bundle: Bundle | str | Path, backend: Backend | str = "auto",
                 coder: str | None = None, hyper: str | None = None, **backend_options: Any) -> None:
        self.bundle = _as_bundle(bundle)
        self.backend = _as_backend(backend, self.bundle, **backend_options)
        self.coder: EntropyCoder = get_coder(coder)
        self.head = self.backend.load(self.bundle, "head")
        self.codec = self.bundle.codec
        self.hyper = make_hyper(self.bundle, self.backend, hyper or "auto") if self.bundle.family == "mshp" else None
        self.last_timings: dict[str, float] = {}

    @property
    def family(self) -> str:
        return self.bundle.family

    def warmup(self) -> None:
        self.coder.warmup()
        self.analyze(np.zeros(self.bundle.input_shape, np.float32))

    def encode(self, image: np.ndarray) -> bytes:
        """One image (uint8 HWC or float CHW in [0,1]) → one packet."""
        return self.analyze(image).packet

    def encode_batch(self, images: np.ndarray) -> list[bytes]:
        return [r.packet for r in self.analyze_batch(images)]

    def analyze(self, image: np.ndarray) -> EncodeResult:
        if isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[0] != 1:
            raise InputError("analyze() takes one image; use analyze_batch() for a batch")
        return self.analyze_batch(image)[0]

    def analyze_batch(self, images: np.ndarray) -> list[EncodeResult]:
        """A batch through the head at once, then one packet per image (with everything measured)."""
        t = Timer()
        x = preprocess(images, self.bundle.input_shape)
        t.lap("preprocess")
        out = self.head.run({"x": x})
        t.lap("head")
        n = x.shape[0]
        shared = {k: v / n for k, v in t.ms.items()}
        return [self._encode_one(out["y"][i], out.get("z", [None] * n)[i], dict(shared)) for i in range(n)]

    def _encode_one(self, y: np.ndarray, z: np.ndarray | None, timings: dict[str, float]) -> EncodeResult:
        t = Timer()
        c = self.codec
        if self.family == "fp":
            sy = quantize(y, channel_means(c.y_medians))
            t.lap("quantize")
            coded = {"y": (_channel_index(sy.shape), c.y_tables)}
            idx, flags, crc = None, 0, 0
            symbols = {"y": sy}
        else:
            assert z is not None and self.hyper is not None and c.z_tables is not None
            sz = quantize(z, channel_means(c.z_medians))
            t.lap("quantize")
            idx, means = hyper_index_means(self.hyper, sz, c)
            t.lap("hyper")
            sy = quantize(y, means)
            crc = index_checksum(idx)
            t.lap("quantize")
            coded = {"z": (_channel_index(sz.shape), c.z_tables), "y": (idx, c.y_tables)}
            symbols, flags = {"z": sz, "y": sy}, self.hyper.flag
        blob = self.coder.encode_stream([(symbols[k], index, tables) for k, (index, tables) in coded.items()])
        t.lap("encode")
        packet = pkt.pack(pkt.Packet(self.family, self.coder.coder_id, self._fingerprint, [], [blob], crc, flags))
        t.lap("packet")
        timings.update(t.ms)
        self.last_timings = timings
        return EncodeResult(packet, symbols, idx, timings, coded)

    @cached_property
    def _fingerprint(self) -> bytes:
        return bytes.fromhex(self.bundle.fingerprint)


@dataclass
class DecodeResult:
    logits: np.ndarray
    y_hat: np.ndarray
    symbols: dict[str, np.ndarray]
    idx: np.ndarray | None
    timings_ms: dict[str, float]


class ServerDecoder:
    """Parses packets (treating them as hostile), decodes the latent and runs the tail."""

    def __init__(self, bundle: Bundle | str | Path, backend: Backend | str = "auto",
                 max_packet_bytes: int | None = None, **backend_options: Any) -> None:
        self.bundle = _as_bundle(bundle)
        self.backend = _as_backend(backend, self.bundle, **backend_options)
        self.tail = self.backend.load(self.bundle, "tail")
        self.codec = self.bundle.codec
        self._hypers: dict[int, FloatHyper | IntHyper] = {}
        names = ["z", "y"] if self.bundle.family == "mshp" else ["y"]
        shapes = [self.bundle.latent_shape(k) for k in names]
        total = sum(int(np.prod(s)) for s in shapes)
        self.expect = pkt.Expect(
            family=self.bundle.family,
            fingerprint=bytes.fromhex(self.bundle.fingerprint),
            shapes=shapes,
            max_bytes=max_packet_bytes or (8 * total + 4096),
            coder_ids=frozenset(cid for cid, _ in CODERS.values()),
        )
        self.last_timings: dict[str, float] = {}

    def _hyper_for(self, flags: int) -> FloatHyper | IntHyper:
        mode = "int" if flags & pkt.FLAG_INT_HYPER else "float"
        key = flags & pkt.FLAG_INT_HYPER
        if key not in self._hypers:
            self._hypers[key] = make_hyper(self.bundle, self.backend, mode)
        return self._hypers[key]

    def warmup(self, packet: bytes | None = None) -> None:
        for cid, _ in CODERS.values():
            get_coder(cid).warmup()
        if packet is not None:
            self.decode(packet)

    def decode(self, packet: bytes) -> np.ndarray:
        """Packet → logits [num_classes]."""
        return self.decode_full(packet).logits

    def decode_timed(self, packet: bytes | memoryview) -> tuple[np.ndarray, dict[str, float]]:
        """Packet → (ŷ [C,H,W], ms per stage): a server's decode step, before its batched tail."""
        t = Timer()
        y_hat, _, _ = self.decode_latent(packet, t)
        return y_hat, t.ms

    def tail_logits(self, y_hat: np.ndarray) -> np.ndarray:
        """ŷ [N,C,H,W] → logits [N, num_classes] (the tail on this decoder's backend)."""
        return self.tail.run({"y_hat": y_hat})["logits"]

    def decode_latent(self, packet: bytes | memoryview, timer: Timer | None = None
                      ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
        """Packet (either format version) → (ŷ [C,H,W], symbols, idx) without running the tail."""
        t = timer or Timer()
        p = pkt.parse(packet, self.expect)
        coder = get_coder(p.coder_id)
        t.lap("parse")
        if p.version == 1:
            return self._decode_sections(p, coder, t)
        c = self.codec
        stream = coder.decode_stream(p.blobs[0])
        if p.family == "fp":
            sy = stream.next(_channel_index(p.shapes[0]), c.y_tables).reshape(p.shapes[0])
            stream.finish()
            t.lap("decode")
            return dequantize(sy, channel_means(c.y_medians)), {"y": sy}, None
        assert c.z_tables is not None
        zshape, yshape = p.shapes
        sz = stream.next(_channel_index(zshape), c.z_tables).reshape(zshape)
        t.lap("decode")
        idx, means = self._checked_index_means(sz, p)
        t.lap("hyper")
        sy = stream.next(idx, c.y_tables).reshape(yshape)
        stream.finish()
        t.lap("decode")
        return dequantize(sy, means), {"z": sz, "y": sy}, idx

    def _checked_index_means(self, sz: np.ndarray, p: pkt.Packet) -> tuple[np.ndarray, np.ndarray]:
        """(idx, means) recomputed from ẑ, refused unless idx matches the packet's check."""
        idx, means = hyper_index_means(self._hyper_for(p.flags), sz, self.codec)
        if index_checksum(idx) & pkt.IDX_CHECK_MASK[p.version] != p.idx_crc:
            raise IndexMismatchError(
                "scale indexes recomputed here differ from the encoder's (a hyper-synthesis mismatch across "
                "devices, or a forged stream); refusing to decode a corrupted tensor"
            )
        return idx, means

    def _decode_sections(self, p: pkt.Packet, coder: EntropyCoder, t: Timer
                         ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
        """A version-1 packet: one section blob per latent."""
        c = self.codec
        if p.family == "fp":
            yshape = p.shapes[0]
            sy = coder.decode(p.blobs[0], _channel_index(yshape), c.y_tables).reshape(yshape)
            t.lap("decode")
            return dequantize(sy, channel_means(c.y_medians)), {"y": sy}, None
        assert c.z_tables is not None
        zshape, yshape = p.shapes
        sz = coder.decode(p.blobs[0], _channel_index(zshape), c.z_tables).reshape(zshape)
        t.lap("decode")
        idx, means = self._checked_index_means(sz, p)
        t.lap("hyper")
        sy = coder.decode(p.blobs[1], idx, c.y_tables).reshape(yshape)
        t.lap("decode")
        return dequantize(sy, means), {"z": sz, "y": sy}, idx

    def decode_full(self, packet: bytes) -> DecodeResult:
        t = Timer()
        y_hat, symbols, idx = self.decode_latent(packet, t)
        logits = self.tail.run({"y_hat": y_hat[None]})["logits"][0]
        t.lap("tail")
        self.last_timings = t.ms
        return DecodeResult(logits, y_hat, symbols, idx, t.ms)

    def decode_batch(self, packets: Sequence[bytes]) -> np.ndarray:
        """Decode each packet, then run the tail once on the batch; raises on the first bad packet."""
        y_hats = [self.decode_latent(p)[0] for p in packets]
        return self.tail.run({"y_hat": np.stack(y_hats)})["logits"]
