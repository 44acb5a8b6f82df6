"""Hostile inputs on the command line: every bad argument, file, bundle or image is a *user* error —
exit status 2, no traceback, one line that names the problem (or argparse's own usage error).

Each case runs ``splitbits.runtime.cli.main`` in-process. An exception nobody converted is reported
by ``main`` as an ``internal error`` with exit status 1, so it fails here. Nothing may listen on or
connect to the network: the serve/send cases must fail while validating, before that.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitbits.runtime.cli import main


@dataclass
class Ctx:
    tmp: Path
    bundles: dict[str, Path]

    @property
    def fp(self) -> str:
        return str(self.bundles["fp"])

    def bundle_with(self, edit: Callable[[Path], None], family: str = "mshp") -> str:
        """A private copy of a tiny bundle, changed by ``edit(copy)``."""
        dst = self.tmp / f"bundle-{family}"
        shutil.copytree(self.bundles[family], dst)
        edit(dst)
        return str(dst)

    def manifest_with(self, change: Callable[[dict], None], family: str = "mshp") -> str:
        def edit(b: Path) -> None:
            m = json.loads((b / "manifest.json").read_text())
            change(m)
            (b / "manifest.json").write_text(json.dumps(m))

        return self.bundle_with(edit, family)

    def file(self, name: str, data: bytes = b"") -> str:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return str(p)

    def npz(self, name: str, **arrays: np.ndarray) -> str:
        p = self.tmp / name
        np.savez(p, **arrays)
        return str(p)

    def imagefolder(self, name: str, write: Callable[[Path], None]) -> str:
        d = self.tmp / name / "cls"
        d.mkdir(parents=True)
        write(d)
        return f"imagefolder:{d.parent}"


def png_header_only(path: Path, w: int, h: int) -> None:
    """A ~60-byte PNG that declares w×h greyscale pixels and holds none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b""))


def _symlinked_manifest(b: Path) -> None:
    outside = b.parent / "outside-manifest.json"
    shutil.move(b / "manifest.json", outside)
    (b / "manifest.json").symlink_to(outside)


def _fifo_golden(b: Path) -> None:
    (b / "golden" / "golden.npz").unlink()
    os.mkfifo(b / "golden" / "golden.npz")


SEND = ["send", "--server", "127.0.0.1:9"]  # bundle inserted after "send"
GOOD_IMAGES = np.zeros((2, 64, 64, 3), np.uint8)
RESULT = json.dumps({"schema": "splitbits.bench/1", "status": "ok", "bytes": {"packet": {"mean": 100}}}).encode()
BAD_RESULT = json.dumps({"schema": "splitbits.bench/1", "status": "ok", "device": [1], "bytes": 5}).encode()

# (id, argv builder, regex the error line must match)
CASES: list[tuple[str, Callable[[Ctx], list[str]], str]] = [
    # --- the findings of the issue
    ("send-concurrency-0", lambda c: [*SEND[:1], c.fp, *SEND[1:], "--concurrency", "0"],
     r"argument --concurrency: must be at least 1, got 0"),
    ("send-unknown-corruption", lambda c: [*SEND[:1], c.fp, *SEND[1:], "--attack", "corruption:nosuch:3"],
     r"argument --attack: unknown corruption 'nosuch'"),
    ("verify-unknown-coder", lambda c: ["verify", c.fp, "--coder", "bogus"],
     r"argument --coder: unknown coder 'bogus'"),
    ("send-unknown-coder", lambda c: [*SEND[:1], c.fp, *SEND[1:], "--coder", "bogus"],
     r"argument --coder: unknown coder 'bogus'"),
    ("serve-port-70000", lambda c: ["serve", c.fp, "--port", "70000"],
     r"argument --port: must be in 0\.\.65535, got 70000"),
    ("bench-garbage-npz", lambda c: ["bench", c.fp, "--inputs", c.file("garbage.npz", b"PK\x03\x04garbage")],
     r"--inputs .*garbage\.npz: not a readable npz file"),
    ("bench-decompression-bomb", lambda c: ["bench", c.fp, "--limit", "1", "--dataset", c.imagefolder(
        "bomb", lambda d: png_header_only(d / "b.png", 15000, 15000))],
     r"image .*b\.png: too many pixels"),
    ("manifest-files-list", lambda c: ["serve", c.manifest_with(lambda m: m.__setitem__("files", list(m["files"]))),
                                       "--port", "0"], r"manifest files must be an object"),
    ("manifest-graph-string", lambda c: ["serve", c.manifest_with(lambda m: m["graphs"].__setitem__("head", "h.onnx")),
                                         "--port", "0"], r"manifest graphs\.head must be an object with a file"),
    ("manifest-latent-string", lambda c: ["serve", c.manifest_with(
        lambda m: m["latents"].__setitem__("y", [12, "x", 15])), "--port", "0"],
     r"manifest latents\.y must be 3 integers"),
    ("manifest-symlink-out", lambda c: ["serve", c.bundle_with(_symlinked_manifest), "--port", "0"],
     r"manifest\.json is a symbolic link"),
    # --- arguments
    ("bench-limit-0", lambda c: ["bench", c.fp, "--limit", "0"], r"argument --limit: must be at least 1, got 0"),
    ("bench-warmup-negative", lambda c: ["bench", c.fp, "--warmup", "-1"], r"argument --warmup: must be at least 0"),
    ("bench-repeat-word", lambda c: ["bench", c.fp, "--repeat", "twice"], r"argument --repeat: expected an integer"),
    ("bench-codec-images-negative", lambda c: ["bench", "codec", "--images", "-1"],
     r"argument --images: must be at least 1, got -1"),
    ("bench-attack-eps-300", lambda c: ["bench", "attack", "--eps", "300"], r"argument --eps: must be in 0\.\.255"),
    ("bench-attack-unknown-device", lambda c: ["bench", "attack", "--device", "gpu0"], r"--device gpu0: "),
    ("attack-cuda-device-that-is-not-there", lambda c: ["attack", c.fp, "--device", "cuda:99"], r"--device cuda:99: "),
    ("bench-unknown-target", lambda c: ["bench", str(c.tmp / "codecs")], r"bundle directory not found: .*codecs"),
    ("serve-max-batch-negative", lambda c: ["serve", c.fp, "--max-batch", "-1"],
     r"argument --max-batch: must be at least 1"),
    ("serve-max-wait-nan", lambda c: ["serve", c.fp, "--max-wait-ms", "nan"],
     r"argument --max-wait-ms: must be at least 0"),
    ("send-link-mbps-0", lambda c: [*SEND[:1], c.fp, *SEND[1:], "--link-mbps", "0"],
     r"argument --link-mbps: must be greater than 0"),
    ("send-bad-server", lambda c: ["send", c.fp, "--server", "host:port"], r"bad port in 'host:port'"),
    ("send-severity-9", lambda c: [*SEND[:1], c.fp, *SEND[1:], "--attack", "corruption:shot_noise:9"],
     r"argument --attack: .*severity must be 1\.\.5"),
    ("warmup-unknown-coder", lambda c: ["warmup", "--coder", "nope"], r"argument --coder: unknown coder 'nope'"),
    ("verify-torch-backend", lambda c: ["verify", c.fp, "--backend", "torch"],
     r"argument --backend: the torch backend is the export's in-process reference"),
    ("bench-unknown-backend", lambda c: ["bench", c.fp, "--backend", "onnx"],
     r"argument --backend: unknown backend 'onnx'"),
    ("serve-torch-backend", lambda c: ["serve", c.fp, "--backend", "torch"],
     r"argument --backend: the torch backend is the export's in-process reference"),
    ("send-unknown-backend", lambda c: [*SEND[:1], c.fp, *SEND[1:], "--backend", "trt"],
     r"argument --backend: unknown backend 'trt'"),
    ("attack-severity-9", lambda c: ["attack", c.fp, "--attack", "fog", "--severity", "9"],
     r"argument --severity: must be in 1\.\.5, got 9"),
    ("export-trt-max-batch-0", lambda c: ["export", c.fp, "--trt", "--max-batch", "0"],
     r"argument --max-batch: must be at least 1"),
    # --- files and paths
    ("verify-json-under-a-file", lambda c: ["verify", c.fp, "--json", c.file("afile") + "/out.json"],
     r"argument --json: cannot write .*afile/out\.json: .*afile is not a directory"),
    ("verify-json-is-a-directory", lambda c: ["verify", c.fp, "--json", str(c.tmp)],
     r"argument --json: .* is a directory"),
    ("device-json-is-a-directory", lambda c: ["device", "--json", str(c.tmp)], r"argument --json: .* is a directory"),
    ("serve-stats-json-under-a-file", lambda c: ["serve", c.fp, "--stats-json", c.file("f") + "/s.json"],
     r"argument --stats-json: cannot write"),
    ("bundle-path-is-a-file", lambda c: ["verify", c.fp + "/manifest.json"], r"manifest\.json is not a directory"),
    ("bench-bundle-missing", lambda c: ["bench", str(c.tmp / "nope")], r"bundle directory not found: .*nope"),
    ("verify-bundle-missing", lambda c: ["verify", str(c.tmp / "nope")], r"bundle directory not found"),
    ("bundle-golden-fifo", lambda c: ["serve", c.bundle_with(_fifo_golden), "--port", "0"],
     r"golden/golden\.npz is not a regular file"),
    ("bundle-manifest-not-json", lambda c: ["verify", c.bundle_with(lambda b: (b / "manifest.json").write_text("{"))],
     r"manifest\.json: invalid JSON"),
    ("bundle-fingerprint-short", lambda c: ["bench", c.manifest_with(lambda m: m.__setitem__("fingerprint", "abc"))],
     r"manifest fingerprint must be 64 hex digits"),
    ("export-missing-checkpoint", lambda c: ["export", str(c.tmp / "nope.pt"), "--out", str(c.tmp / "b")],
     r"nope\.pt"),
    ("campaign-missing-yaml", lambda c: ["campaign", str(c.tmp / "nope.yaml")], r"campaign config not found"),
    ("campaign-binary-yaml", lambda c: ["campaign", c.file("c.yaml", b"\x9c\xff\x00"), "--dry-run"],
     r"c\.yaml: not a text \(YAML\) file"),
    ("report-empty-folder", lambda c: ["report", str(c.tmp)], r"no splitbits bench/send results found"),
    ("report-out-under-a-file", lambda c: ["report", c.file("r.json", RESULT), "--out", c.file("g") + "/r"],
     r"error: .*/g/r: (Not a directory|File exists)$"),
    ("report-binary-file", lambda c: ["report", c.file("r.json", b"\x9c\xff")], r"no splitbits bench/send results"),
    ("report-malformed-result", lambda c: ["report", c.file("r.json", BAD_RESULT)],
     r"r\.json: not a valid bench/send result: device must be an object"),
    ("report-missing-file", lambda c: ["report", str(c.tmp / "none.json")], r"argument results: no such file"),
    ("report-unknown-format", lambda c: ["report", str(c.tmp), "--format", "pdf"], r"unknown report formats \['pdf'\]"),
    # --- input files and datasets
    ("bench-inputs-missing", lambda c: ["bench", c.fp, "--inputs", str(c.tmp / "none.npz")],
     r"argument --inputs: no such file"),
    ("bench-inputs-string-labels", lambda c: ["bench", c.fp, "--inputs",
                                              c.npz("s.npz", images=GOOD_IMAGES, labels=np.array(["a", "b"]))],
     r"labels must be 2 integers"),
    ("bench-inputs-wrong-shape", lambda c: ["bench", c.fp, "--inputs", c.npz("w.npz", images=GOOD_IMAGES[:, :32])],
     r"images must be uint8 N×64×64×3"),
    ("bench-inputs-empty", lambda c: ["bench", c.fp, "--inputs", c.npz("e.npz", images=GOOD_IMAGES[:0])],
     r"0 images; expected 1\.\."),
    ("bench-inputs-and-attack", lambda c: ["bench", c.fp, "--inputs", c.npz("ok.npz", images=GOOD_IMAGES),
                                           "--attack", "corruption:shot_noise:1"], r"exclude each other"),
    ("bench-image-too-many-pixels", lambda c: ["bench", c.fp, "--limit", "1", "--dataset", c.imagefolder(
        "big", lambda d: png_header_only(d / "x.png", 9000, 9000))],
     r"x\.png: 9000×9000 pixels \(81 megapixels\); the limit is 64 megapixels"),
    ("bench-image-float", lambda c: ["bench", c.fp, "--limit", "1", "--dataset", c.imagefolder(
        "float", lambda d: Image.fromarray(np.zeros((64, 64), np.float32)).save(d / "f.tif"))],
     r"f\.tif: 32-bit float pixels \(mode F\)"),
    ("bench-image-broken", lambda c: ["bench", c.fp, "--limit", "1", "--dataset", c.imagefolder(
        "broken", lambda d: (d / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnothing"))], r"cannot read image .*x\.png"),
    ("bench-unknown-dataset", lambda c: ["bench", c.fp, "--dataset", "nosuch:x"], r"unknown dataset scheme 'nosuch'"),
    ("bench-imagefolder-missing", lambda c: ["bench", c.fp, "--dataset", f"imagefolder:{c.tmp / 'none'}"],
     r"path not found or not a directory"),
]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Listening or connecting fails the case (as an internal error), it never hangs."""

    async def refuse(*_a, **_k):
        raise AssertionError("the command reached the network before validating its input")

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "create_server", refuse)
    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "create_connection", refuse)


@pytest.mark.parametrize(("build", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_user_error(build, match, tiny_bundles, tmp_path, capsys) -> None:
    argv = build(Ctx(tmp_path, tiny_bundles))
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    last = lines[-1]
    assert re.match(r"splitbits [\w ]+: error: ", last), err
    if "usage:" not in err:  # not argparse's usage error: exactly one line
        assert len(lines) == 1, err
    assert re.search(match, last), f"{match!r} not in {last!r}"


def test_unexpected_exception_is_an_internal_error_not_a_user_error(monkeypatch, capsys) -> None:
    """A bug stays visible: exit 1, one 'internal error' line; -v adds the traceback."""
    import splitbits.jetson.device as device

    monkeypatch.setattr(device, "device_info", lambda: {}["boom"])
    assert main(["device"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("splitbits device: internal error: KeyError: 'boom' "
                           "(a bug in splitbits; `splitbits -v device ...` shows the traceback)")
    assert main(["-v", "device"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("internal error: KeyError: 'boom'")


def test_help_still_exits_zero(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--help"])
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("tegrastats") is not None, reason="this machine has tegrastats")
def test_power_on_without_tegrastats(tiny_bundles, capsys) -> None:
    assert main(["bench", str(tiny_bundles["fp"]), "--power", "on", "--limit", "1"]) == 2
    assert capsys.readouterr().err.strip() == ("splitbits bench: error: --power on needs tegrastats (a Jetson), "
                                               "which is not on PATH here; use --power auto/off")
