"""A corpus of malicious and malformed checkpoints, built at test time (payloads need a marker path).

Every payload, if it ever ran, would create ``marker``; the tests assert that it never exists after
any entry point of splitbits has been pointed at the file, and that plain ``pickle`` *does* run it
(so the payloads are live, not duds). ``python tests/checkpoint_corpus.py DIR`` writes the corpus
to DIR for manual probing (marker: DIR/PWNED).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from splitbits.trainer.checkpoint import content_digest, save_checkpoint
from splitbits.trainer.models import ModelSpec, build_model

# the spec of the checkpoints the valid-looking entries imitate (the builtin dataset has 12 classes)
TINY_STUDENT = ModelSpec(arch="tiny", family="mshp", num_classes=12, input_size=64)


class Reduce:
    """An object that pickles as ``func(*args)``: what a hostile checkpoint smuggles in."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch_cmd(marker: Path) -> str:
    return f"touch {marker}"


def payloads(marker: Path) -> dict[str, object]:
    """Objects whose unpickling creates ``marker`` (each through a different door)."""
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "os_system": Reduce(os.system, _touch_cmd(marker)),
        "builtins_exec": Reduce(builtins.exec, code),
        "builtins_eval": Reduce(builtins.eval, f"__import__('os').system({_touch_cmd(marker)!r})"),
        "subprocess_call": Reduce(subprocess.call, ["touch", str(marker)]),
    }


def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(TINY_STUDENT).state_dict()


def _flip_tensor_byte(src: Path, dst: Path) -> None:
    """Copy ``src`` with one byte flipped in the middle of its largest tensor storage."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    # local file header: 30 bytes + name + extra, then the (stored, uncompressed) data
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x10
    dst.write_bytes(bytes(data))


def build_corpus(root: Path, marker: Path) -> dict[str, Path]:
    """Write every case into ``root``; returns name → path. Categories: ``payload-*`` (code in the
    pickle), ``type-*`` (wrong content), ``tamper-*`` (flipped or edited bytes), ``file-*`` (not a
    checkpoint at all)."""
    root.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Path] = {}

    def save(name: str, obj: object, **kw: object) -> None:
        cases[name] = root / f"{name}.pt"
        torch.save(obj, cases[name], **kw)

    sd = _tiny_state()
    for pname, p in payloads(marker).items():
        save(f"payload-{pname}", {"model": sd, "args": p})  # torchdistill layout, payload as 'args'
    save("payload-legacy-format", {"model": sd, "x": payloads(marker)["os_system"]},
         _use_new_zipfile_serialization=False)
    cases["payload-raw-pickle"] = root / "payload-raw-pickle.pt"
    cases["payload-raw-pickle"].write_bytes(pickle.dumps(payloads(marker)["os_system"], protocol=2))
    save("payload-object-array", {"model": sd, "a": np.array([payloads(marker)["builtins_exec"]], dtype=object)})

    valid = save_checkpoint(root / "valid.pt", build_model(TINY_STUDENT), TINY_STUDENT, kind="student",
                            metrics={"finished": True})
    ck = torch.load(valid, weights_only=True)
    hidden = dict(ck, metrics={"finished": True, "note": payloads(marker)["os_system"]})
    save("payload-in-splitbits-metrics", hidden)

    save("type-list-root", [1, 2, 3])
    save("type-tensor-root", torch.zeros(3))
    save("type-model-is-list", {"model": [1, 2]})
    save("type-state-values-are-strings", {"model": {"conv.weight": "x"}})
    save("type-empty-dict", {})
    for name, edit in {
        "type-splitbits-spec-is-string": {"spec": "resnet50"},
        "type-splitbits-unknown-arch": {"spec": dict(ck["spec"], arch="evil")},
        "type-splitbits-wrong-shapes": {"model": {k: v.reshape(-1)[:1] for k, v in ck["model"].items()}},
        "type-splitbits-version-99": {"version": 99},
    }.items():
        obj = dict(ck, **edit)
        obj["digest"] = content_digest(obj)  # re-signed: only the content checks can catch it
        save(name, obj)

    cases["tamper-flipped-tensor-byte"] = root / "tamper-flipped-tensor-byte.pt"
    _flip_tensor_byte(valid, cases["tamper-flipped-tensor-byte"])
    save("tamper-edited-metrics", dict(ck, metrics={"finished": True, "val_top1": 99.9}))  # digest not updated
    save("tamper-digest-removed", {k: v for k, v in ck.items() if k != "digest"})

    cases["file-empty"] = root / "file-empty.pt"
    cases["file-empty"].write_bytes(b"")
    cases["file-random-bytes"] = root / "file-random-bytes.pt"
    cases["file-random-bytes"].write_bytes(np.random.default_rng(0).bytes(4096))
    cases["file-truncated"] = root / "file-truncated.pt"
    cases["file-truncated"].write_bytes(valid.read_bytes()[: valid.stat().st_size // 2])
    cases["file-directory"] = root / "file-directory.pt"
    cases["file-directory"].mkdir()
    cases["file-missing"] = root / "file-missing.pt"
    valid.unlink()
    return cases


def live_payloads(cases: dict[str, Path], marker: Path) -> dict[str, bool]:
    """For each ``payload-*`` case: does unrestricted unpickling (``torch.load(weights_only=False)``)
    run it? Proves the payloads are real (they only create ``marker``, removed again here)."""
    live = {}
    for name, path in cases.items():
        if not name.startswith("payload-"):
            continue
        marker.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            torch.load(path, weights_only=False)
        live[name] = marker.exists()
        marker.unlink(missing_ok=True)
    return live


if __name__ == "__main__":  # pragma: no cover - manual probing
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "checkpoint_corpus")
    for n, p in build_corpus(out, out.resolve() / "PWNED").items():
        print(f"{n:40s} {p}")
