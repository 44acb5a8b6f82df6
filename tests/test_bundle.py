"""Bundles: verified on load, tampering is a clear error; export verifies itself."""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch

from splitbits.runtime.bundle import load_bundle
from splitbits.runtime.errors import BundleError, VerificationError
from splitbits.runtime.verify import verify_bundle


@pytest.fixture()
def mshp_copy(tiny_bundles, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundles["mshp"], dst)
    return dst


def test_manifest_contents(tiny_bundles):
    b = load_bundle(tiny_bundles["mshp"])
    m = b.manifest
    assert m["family"] == "mshp" and m["opset"] <= 20
    assert set(m["files"]) >= {"head.onnx", "hyper.onnx", "tail.onnx", "codec.npz", "golden/golden.npz"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert m["latents"] == {"y": [12, 15, 15], "z": [8, 4, 4]}
    assert m["input"]["shape"] == [3, 64, 64]
    assert {"torch", "compressai", "onnxruntime", "splitbits"} <= set(m["versions"])
    assert m["verification"]["onnxruntime"]["ok"] is True


def test_verify_command_passes(tiny_bundles):
    rep = verify_bundle(tiny_bundles["fp"], "onnxruntime")
    assert rep.ok and rep.top1_agree == rep.images and rep.packets_ok == rep.images


@pytest.mark.parametrize("victim", ["codec.npz", "head.onnx", "golden/golden.npz"])
def test_tampered_file(mshp_copy, victim):
    p = mshp_copy / victim
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(mshp_copy)


def test_missing_file(mshp_copy):
    (mshp_copy / "tail.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing file tail\.onnx"):
        load_bundle(mshp_copy)


def test_missing_or_broken_manifest(mshp_copy, tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    (mshp_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="invalid JSON"):
        load_bundle(mshp_copy)


def test_future_format_version(mshp_copy):
    mp = mshp_copy / "manifest.json"
    m = json.loads(mp.read_text())
    m["format_version"] = 99
    mp.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="version 99"):
        load_bundle(mshp_copy)


def test_path_escape_in_manifest(mshp_copy):
    mp = mshp_copy / "manifest.json"
    m = json.loads(mp.read_text())
    m["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    mp.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(mshp_copy)


def test_swapped_model_file_changes_fingerprint(mshp_copy, tiny_bundles):
    """Replacing a graph and fixing its hash in the manifest still fails: the fingerprint is bound."""
    mp = mshp_copy / "manifest.json"
    m = json.loads(mp.read_text())
    shutil.copy(tiny_bundles["fp"] / "tail.onnx", mshp_copy / "tail.onnx")
    from splitbits.runtime.bundle import sha256_file

    m["files"]["tail.onnx"] = {"sha256": sha256_file(mshp_copy / "tail.onnx"),
                               "bytes": (mshp_copy / "tail.onnx").stat().st_size}
    mp.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="fingerprint"):
        load_bundle(mshp_copy)


def test_export_refuses_mismatched_onnx(tiny_models, images, tmp_path, monkeypatch):
    """A graph that disagrees with torch fails the export, naming the tensor; nothing is left behind."""
    from splitbits.export import bundle as ex

    real = ex._Tail.forward
    monkeypatch.setattr(ex._Tail, "forward", lambda self, y: real(self, y) + 0.5)
    with pytest.raises(VerificationError, match=r"tail\.logits"):
        ex.export_bundle(tiny_models["fp"], tmp_path / "bad", images=images[:2])
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.glob(".bad.partial-*"))


def test_export_input_errors(tiny_models, images, tmp_path):
    from splitbits.export.bundle import export_bundle
    from splitbits.trainer.models import ModelSpec, build_model

    with pytest.raises(TypeError, match="split students"):
        export_bundle(build_model(ModelSpec(arch="tiny")), tmp_path / "t", images=images[:2])
    with pytest.raises(ValueError, match="opset"):
        export_bundle(tiny_models["fp"], tmp_path / "o", images=images[:2], opset=21)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        export_bundle(tiny_models["fp"], tmp_path / "exists", images=images[:2])


def _old_compressai_names(sd: dict) -> OrderedDict:
    """Rename to the key names of the compressai (<1.2) that trained sc2bench's checkpoints."""
    out = OrderedDict()
    for k, v in sd.items():
        for kind, old in (("matrices", "_matrix"), ("biases", "_bias"), ("factors", "_factor")):
            k = k.replace(f"entropy_bottleneck.{kind}.", f"entropy_bottleneck.{old}")
        if not k.endswith("scale_bound"):
            out[k] = v
    return out


@pytest.mark.parametrize("family", ["fp", "mshp"])
@pytest.mark.parametrize("wrap", [True, False])
def test_sc2bench_checkpoint_loads(family, wrap, tiny_models, tmp_path):
    from splitbits.trainer.checkpoint import load_model

    src = tiny_models[family]
    sd = _old_compressai_names(src.state_dict())
    assert any("_matrix0" in k for k in sd)
    path = tmp_path / "ck.pt"
    torch.save({"model": sd, "optimizer": {}} if wrap else sd, path)
    model, info = load_model(path, src.spec)
    assert info["format"] == "sc2bench"
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), src(x).numpy(), atol=1e-6)
        a, b = model.compress_reference(x), src.compress_reference(x)
    assert a["strings"] == b["strings"]


def test_sc2bench_checkpoint_missing_keys(tiny_models, tmp_path):
    from splitbits.trainer.checkpoint import load_model

    sd = tiny_models["fp"].state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("layer2.")}
    torch.save(sd, tmp_path / "ck.pt")
    with pytest.raises(ValueError, match="lacks"):
        load_model(tmp_path / "ck.pt", tiny_models["fp"].spec)
