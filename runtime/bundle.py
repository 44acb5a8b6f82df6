"""Loading and verifying a bundle directory (see DESIGN.md: head/hyper/tail ONNX, codec.npz,
manifest.json, golden/, engines).

``manifest.json`` (format_version 1)::

    {"format": "splitbits-bundle", "format_version": 1, "family": "fp" | "mshp",
     "fingerprint": sha256 hex over the model files, "model": {spec...},
     "input": {"shape": [3, H, W], "dtype": "float32", "range": [0, 1], "layout": "NCHW",
               "normalisation": {"mean": [...], "std": [...], "inside_head": true}},
     "latents": {"y": [C, H, W], "z": [C, H, W]}, "graphs": {"head": {"file", "inputs", "outputs"}, ...},
     "opset": 17, "versions": {...}, "files": {relpath: {"sha256", "bytes"}}, "verification": {...}}

Every file listed is hashed on load; a missing, extra-model or tampered file is a ``BundleError``.
The manifest is hostile input like a packet: every key the runtime reads is checked for its type,
shape and bounds (:func:`check_manifest`), and every listed file, the manifest included, must be a
regular file inside the bundle (no symlink, FIFO, device or directory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from splitbits.runtime.codec.tables import CdfTables
from splitbits.runtime.errors import BundleError

log = logging.getLogger(__name__)

FORMAT = "splitbits-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CODEC = "codec.npz"
# Files whose bytes define the model's behaviour; the fingerprint covers exactly these.
MODEL_FILES = ("head.onnx", "hyper.onnx", "tail.onnx", "codec.npz", "hyper_int.npz", "hyper_int.onnx")
FAMILY_LATENTS = {"fp": ("y",), "mshp": ("y", "z")}
# Bounds of a manifest's numbers: packets store latent C, H, W as u16; inputs are images.
MAX_MANIFEST_BYTES = 16 << 20
MAX_LATENT_DIM = 65535
MAX_LATENT_ELEMENTS = 1 << 24
MAX_INPUT_SIDE = 8192
_HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_of(files: dict[str, dict[str, Any]]) -> str:
    """sha256 over ``name:sha256`` of the model files present (sorted): the bundle's identity."""
    h = hashlib.sha256()
    for name in sorted(n for n in files if n in MODEL_FILES):
        h.update(f"{name}:{files[name]['sha256']}\n".encode())
    return h.hexdigest()


@dataclass
class CodecParams:
    """The entropy-model side of a bundle (from ``codec.npz``)."""

    family: str
    y_tables: CdfTables
    y_medians: np.ndarray | None = None  # FP
    z_tables: CdfTables | None = None  # MSHP
    z_medians: np.ndarray | None = None
    scale_table: np.ndarray | None = None
    scale_bound: float = 0.11
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, family: str) -> CodecParams:
        """``codec.npz`` at ``path``, checked (a damaged or inconsistent file is a ``BundleError``)."""
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:  # zipfile/ValueError/OSError on a damaged file
            raise BundleError(f"{path}: unreadable codec tables ({exc})") from exc
        return cls.from_arrays(arrays, family, path)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], family: str, path: Path | str = CODEC) -> CodecParams:
        """The ``codec.npz`` arrays (e.g. as the export builds them), checked; ``path`` names them in errors."""
        path = Path(path)

        def need(key: str, scalar: bool = False) -> np.ndarray:
            if key not in arrays:
                raise BundleError(f"{path}: missing array {key!r}")
            a = arrays[key]
            finite = a.dtype.kind in "biu" or (a.dtype.kind == "f" and bool(np.isfinite(a).all()))
            if not finite or (scalar and a.size != 1):
                raise BundleError(f"{path}: array {key!r} must be {'one number' if scalar else 'finite numbers'}, "
                                  f"got {a.dtype} {a.shape}")
            return a

        precision = int(need("precision", scalar=True))

        def tables(prefix: str) -> CdfTables:
            return CdfTables.create(need(f"{prefix}_cdf"), need(f"{prefix}_cdf_length"),
                                    need(f"{prefix}_offset"), precision, name=f"{path.name}:{prefix}")

        if family == "fp":
            y = tables("y")
            med = need("y_medians").astype(np.float32).reshape(-1)
            if med.shape != (y.num_tables,):
                raise BundleError(f"{path}: y_medians must have one entry per channel")
            return cls(family, y, y_medians=med)
        if family == "mshp":
            z = tables("z")
            zmed = need("z_medians").astype(np.float32).reshape(-1)
            if zmed.shape != (z.num_tables,):
                raise BundleError(f"{path}: z_medians must have one entry per channel")
            y = tables("y")
            st = need("scale_table").astype(np.float32).reshape(-1)
            if st.shape != (y.num_tables,) or (np.diff(st) <= 0).any() or st[0] <= 0:
                raise BundleError(f"{path}: scale_table must be increasing, positive, one per y table")
            return cls(family, y, z_tables=z, z_medians=zmed, scale_table=st,
                       scale_bound=float(need("scale_bound", scalar=True)))
        raise BundleError(f"unknown family {family!r}")


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    codec: CodecParams

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def fingerprint8(self) -> bytes:
        return bytes.fromhex(self.manifest["fingerprint"])[:8]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["input"]["shape"])  # type: ignore[return-value]

    def latent_shape(self, name: str) -> tuple[int, int, int]:
        return tuple(self.manifest["latents"][name])  # type: ignore[return-value]

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest.get("model", {}).get("class_names")

    def graph(self, name: str) -> Path:
        graphs = self.manifest.get("graphs", {})
        if name not in graphs:
            raise BundleError(f"bundle {self.path} has no {name!r} graph")
        return self.path / graphs[name]["file"]

    def file(self, rel: str) -> Path:
        return self.path / rel

    def engines(self) -> dict[str, Any]:
        return self.manifest.get("engines", {})


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _need(ok: bool, mpath: Path, key: str, what: str, value: Any) -> None:
    if not ok:
        raise BundleError(f"{mpath}: manifest {key} must be {what}, got {_short(value)}")


def _is_int(v: Any, lo: int, hi: int | None = None) -> bool:
    return type(v) is int and v >= lo and (hi is None or v <= hi)


def _shape(value: Any, mpath: Path, key: str, hi: int) -> None:
    _need(isinstance(value, list) and len(value) == 3 and all(_is_int(v, 1, hi) for v in value),
          mpath, key, f"3 integers in 1..{hi}", value)


def _relpath(value: Any, mpath: Path, key: str) -> None:
    """A relative path that stays inside the bundle (``golden/golden.npz``, ``engines/x.engine``)."""
    _need(isinstance(value, str) and bool(value), mpath, key, "a file name", value)
    parts = value.replace("\\", "/").split("/")
    if value.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise BundleError(f"{mpath}: manifest entry {value!r} ({key}) points outside the bundle")


def check_manifest(manifest: dict[str, Any], mpath: Path) -> None:
    """Types, shapes and bounds of every manifest key the runtime reads; a :class:`BundleError` naming
    the key otherwise (format and version are checked by :func:`load_manifest` before this)."""
    for key in ("family", "fingerprint", "input", "latents", "graphs", "files"):
        if key not in manifest:
            raise BundleError(f"{mpath}: manifest lacks {key!r}")
    family = manifest["family"]
    _need(family in FAMILY_LATENTS, mpath, "family", "'fp' or 'mshp'", family)
    fp = manifest["fingerprint"]
    _need(isinstance(fp, str) and _HEX64.fullmatch(fp) is not None, mpath, "fingerprint", "64 hex digits", fp)
    inp = manifest["input"]
    _need(isinstance(inp, dict) and "shape" in inp, mpath, "input", "an object with a shape", inp)
    _shape(inp["shape"], mpath, "input.shape", MAX_INPUT_SIDE)
    _need(inp["shape"][0] == 3, mpath, "input.shape", "[3, H, W] (RGB)", inp["shape"])
    lat = manifest["latents"]
    want = FAMILY_LATENTS[family]
    _need(isinstance(lat, dict) and sorted(lat) == sorted(want), mpath, "latents",
          f"an object with {' and '.join(want)} for family {family}", lat)
    for name, shape in lat.items():
        _shape(shape, mpath, f"latents.{name}", MAX_LATENT_DIM)
        n = shape[0] * shape[1] * shape[2]
        _need(n <= MAX_LATENT_ELEMENTS, mpath, f"latents.{name}", f"at most {MAX_LATENT_ELEMENTS} elements", shape)
    files = manifest["files"]
    _need(isinstance(files, dict) and bool(files), mpath, "files", "an object {path: {sha256, bytes}}", files)
    for rel, meta in files.items():
        _relpath(rel, mpath, "files")
        key = f"files[{rel!r}]"
        _need(isinstance(meta, dict), mpath, key, "an object {sha256, bytes}", meta)
        _need(isinstance(meta.get("sha256"), str) and _HEX64.fullmatch(meta["sha256"]) is not None,
              mpath, f"{key}.sha256", "64 hex digits", meta.get("sha256"))
        _need(_is_int(meta.get("bytes"), 0), mpath, f"{key}.bytes", "an integer ≥ 0", meta.get("bytes"))
    graphs = manifest["graphs"]
    _need(isinstance(graphs, dict), mpath, "graphs", "an object {name: {file, inputs, outputs}}", graphs)
    for name, g in graphs.items():
        key = f"graphs.{name}"
        _need(isinstance(g, dict) and "file" in g, mpath, key, "an object with a file", g)
        _relpath(g["file"], mpath, f"{key}.file")
        if g["file"] not in files:
            raise BundleError(f"{mpath}: graph file {g['file']} is not listed in the manifest")
        for io in ("inputs", "outputs"):
            v = g.get(io, {})
            _need(isinstance(v, (dict, list)) and all(isinstance(k, str) for k in v), mpath, f"{key}.{io}",
                  "tensor names (a list or an object)", v)
    engines = manifest.get("engines", {})
    _need(isinstance(engines, dict), mpath, "engines", "an object {key: {file, sha256, ...}}", engines)
    for name, e in engines.items():
        key = f"engines[{name!r}]"
        _need(isinstance(e, dict) and "file" in e, mpath, key, "an object with a file", e)
        _relpath(e["file"], mpath, f"{key}.file")
        if e.get("sha256") is not None:
            _need(isinstance(e["sha256"], str) and _HEX64.fullmatch(e["sha256"]) is not None, mpath,
                  f"{key}.sha256", "64 hex digits", e["sha256"])
    for key in ("model", "versions"):
        _need(isinstance(manifest.get(key, {}), dict), mpath, key, "an object", manifest.get(key))
    names = manifest.get("model", {}).get("class_names")
    _need(names is None or (isinstance(names, list) and all(isinstance(n, str) for n in names)), mpath,
          "model.class_names", "a list of strings", names)
    src = manifest.get("source")
    _need(src is None or isinstance(src, str), mpath, "source", "a path or null", src)
    src_sha = manifest.get("source_sha256")
    _need(src_sha is None or (isinstance(src_sha, str) and _HEX64.fullmatch(src_sha) is not None), mpath,
          "source_sha256", "64 hex digits or null", src_sha)


def bundle_file(root: Path, rel: str) -> Path:
    """``root/rel`` if it is a regular file whose real path is inside the bundle, else a BundleError
    (missing, a symlink, a FIFO/device/directory, or reached through a link that leaves the bundle)."""
    p = root / rel
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        raise BundleError(f"{root}: missing file {rel}") from None
    except OSError as exc:
        raise BundleError(f"{root}: cannot read {rel} ({exc.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise BundleError(f"{root}: {rel} is a symbolic link; bundle files must be regular files in the bundle")
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{root}: {rel} is not a regular file")
    if root.resolve() not in p.resolve().parents:
        raise BundleError(f"{root}: manifest entry {rel!r} points outside the bundle")
    return p


def load_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    mpath = path / MANIFEST
    if not path.exists():
        raise BundleError(f"bundle directory not found: {path}")
    if not path.is_dir():
        raise BundleError(f"{path} is not a directory; a bundle is the directory that holds {MANIFEST}")
    if not os.path.lexists(mpath):
        raise BundleError(f"{path}: no {MANIFEST}; not a bundle (or an interrupted export)")
    bundle_file(path, MANIFEST)
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath}: {mpath.stat().st_size} bytes, more than a manifest can be "
                          f"({MAX_MANIFEST_BYTES >> 20} MiB)")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{mpath}: invalid JSON ({exc})") from exc
    except OSError as exc:
        raise BundleError(f"{mpath}: unreadable ({exc.strerror})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not a splitbits bundle manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{mpath}: bundle format version {_short(version)}; this runtime reads {FORMAT_VERSION}")
    check_manifest(manifest, mpath)
    return manifest


def verify_files(path: Path, manifest: dict[str, Any], *, hashes: bool = True) -> None:
    files: dict[str, dict[str, Any]] = manifest["files"]
    for rel, meta in files.items():
        fp = bundle_file(path, rel)
        size = fp.stat().st_size
        if size != meta["bytes"]:
            raise BundleError(f"{path}: {rel} has {size} bytes, manifest says {meta['bytes']}")
        if hashes and sha256_file(fp) != meta["sha256"]:
            raise BundleError(f"{path}: {rel} does not match its sha256 in the manifest (tampered or corrupted)")
    for name in MODEL_FILES:
        if os.path.lexists(path / name) and name not in files:
            raise BundleError(f"{path}: {name} is present but not listed in the manifest")
    if fingerprint_of(files) != manifest["fingerprint"]:
        raise BundleError(f"{path}: fingerprint does not match the listed model files")


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Load a bundle; with ``verify`` every listed file's sha256 is checked first."""
    path = Path(path)
    manifest = load_manifest(path)
    verify_files(path, manifest, hashes=verify)
    if CODEC not in manifest["files"]:
        raise BundleError(f"{path}: {CODEC} is not listed in the manifest")
    codec = CodecParams.load(path / CODEC, manifest["family"])
    if codec.y_tables.num_tables != (
        manifest["latents"]["y"][0] if manifest["family"] == "fp" else len(codec.scale_table)
    ):
        raise BundleError(f"{path}: codec tables do not match the latent shape")
    theirs = manifest.get("versions", {}).get("splitbits")
    ours = runtime_version()
    if theirs and theirs != ours:
        log.info("bundle written by splitbits %s, running %s", theirs, ours)
    return Bundle(path, manifest, codec)


def runtime_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("splitbits")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"
