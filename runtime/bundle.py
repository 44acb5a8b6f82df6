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
"""

from __future__ import annotations

import hashlib
import json
import logging
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
MODEL_FILES = ("head.onnx", "hyper.onnx", "tail.onnx", "codec.npz", "hyper_int.npz")


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
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:  # zipfile/ValueError/OSError on a damaged file
            raise BundleError(f"{path}: unreadable codec tables ({exc})") from exc

        def need(key: str) -> np.ndarray:
            if key not in arrays:
                raise BundleError(f"{path}: missing array {key!r}")
            return arrays[key]

        precision = int(need("precision"))

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
                       scale_bound=float(need("scale_bound")))
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


def load_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"bundle directory not found: {path}")
    if not mpath.is_file():
        raise BundleError(f"{path}: no {MANIFEST}; not a bundle (or an interrupted export)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath}: invalid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not a splitbits bundle manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{mpath}: bundle format version {version}; this runtime reads {FORMAT_VERSION}")
    for key in ("family", "fingerprint", "input", "latents", "graphs", "files"):
        if key not in manifest:
            raise BundleError(f"{mpath}: manifest lacks {key!r}")
    return manifest


def verify_files(path: Path, manifest: dict[str, Any], *, hashes: bool = True) -> None:
    files: dict[str, dict[str, Any]] = manifest["files"]
    for rel, meta in files.items():
        fp = (path / rel).resolve()
        if path.resolve() not in fp.parents:
            raise BundleError(f"{path}: manifest entry {rel!r} points outside the bundle")
        if not fp.is_file():
            raise BundleError(f"{path}: missing file {rel}")
        if fp.stat().st_size != meta.get("bytes"):
            raise BundleError(f"{path}: {rel} has {fp.stat().st_size} bytes, manifest says {meta.get('bytes')}")
        if hashes and sha256_file(fp) != meta.get("sha256"):
            raise BundleError(f"{path}: {rel} does not match its sha256 in the manifest (tampered or corrupted)")
    for name in MODEL_FILES:
        if (path / name).exists() and name not in files:
            raise BundleError(f"{path}: {name} is present but not listed in the manifest")
    if fingerprint_of(files) != manifest["fingerprint"]:
        raise BundleError(f"{path}: fingerprint does not match the listed model files")


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Load a bundle; with ``verify`` every listed file's sha256 is checked first."""
    path = Path(path)
    manifest = load_manifest(path)
    verify_files(path, manifest, hashes=verify)
    for g in manifest["graphs"].values():
        if g["file"] not in manifest["files"]:
            raise BundleError(f"{path}: graph file {g['file']} is not listed in the manifest")
    codec = CodecParams.load(path / CODEC, manifest["family"])
    expected_lat = {"fp": {"y"}, "mshp": {"y", "z"}}[manifest["family"]]
    if set(manifest["latents"]) != expected_lat:
        raise BundleError(f"{path}: latents {sorted(manifest['latents'])} do not fit family {manifest['family']}")
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
