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


@pytest.mark.slow
def test_export_refuses_mismatched_onnx(tiny_models, images, tmp_path, monkeypatch):
    """A graph that disagrees with torch fails the export, naming the tensor; nothing is left behind."""
    from splitbits.export import bundle as ex

    real = ex.GraphModule.forward
    monkeypatch.setattr(ex.GraphModule, "forward",
                        lambda self, x: real(self, x) + 0.5 if self.graph == "tail" else real(self, x))
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


# --------------------------------------------------------------------------------------------
# the manifest is hostile input: types, shapes and bounds of every key the runtime reads
# --------------------------------------------------------------------------------------------


def _set(path: str, value):
    """A mutation of the manifest: set the dotted ``path`` (list indexes as integers) to ``value``."""

    def apply(m: dict) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for k in parents:
            m = m[k]
        m[last] = value

    return apply


def _files_as_list(m: dict) -> None:
    m["files"] = list(m["files"])


MANIFEST_CASES = [
    ("files-list", _files_as_list, r"manifest files must be an object"),
    ("files-empty", _set("files", {}), r"manifest files must be an object"),
    ("file-entry-str", lambda m: m["files"].__setitem__("head.onnx", "abc"),
     r"files\['head\.onnx'\] must be an object"),
    ("file-sha-short", lambda m: m["files"]["head.onnx"].__setitem__("sha256", "ab"),
     r"files\['head\.onnx'\]\.sha256 must be 64 hex digits"),
    ("file-bytes-neg", lambda m: m["files"]["tail.onnx"].__setitem__("bytes", -1),
     r"files\['tail\.onnx'\]\.bytes must be an integer"),
    ("file-bytes-str", lambda m: m["files"]["tail.onnx"].__setitem__("bytes", "12"),
     r"files\['tail\.onnx'\]\.bytes must be an integer"),
    ("file-absolute", lambda m: m["files"].__setitem__("/etc/passwd", {"sha256": "0" * 64, "bytes": 1}),
     r"outside the bundle"),
    ("graph-str", _set("graphs.head", "head.onnx"), r"manifest graphs\.head must be an object with a file"),
    ("graphs-list", _set("graphs", ["head"]), r"manifest graphs must be an object"),
    ("graph-file-int", _set("graphs.tail.file", 5), r"graphs\.tail\.file must be a file name"),
    ("graph-file-escape", _set("graphs.tail.file", "../tail.onnx"), r"outside the bundle"),
    ("graph-inputs-int", _set("graphs.tail.inputs", 5), r"graphs\.tail\.inputs must be tensor names"),
    ("latent-str", _set("latents.y", [12, "x", 15]), r"latents\.y must be 3 integers in 1\.\.65535"),
    ("latent-2d", _set("latents.y", [12, 15]), r"latents\.y must be 3 integers"),
    ("latent-zero", _set("latents.z", [8, 0, 4]), r"latents\.z must be 3 integers"),
    ("latent-bool", _set("latents.z", [8, True, 4]), r"latents\.z must be 3 integers"),
    ("latent-u16", _set("latents.y", [70000, 1, 1]), r"latents\.y must be 3 integers in 1\.\.65535"),
    ("latent-huge", _set("latents.y", [65535, 65535, 65535]), r"latents\.y must be at most \d+ elements"),
    ("latents-family", lambda m: m["latents"].pop("z"), r"latents must be an object with y and z"),
    ("input-2d", _set("input.shape", [3, 64]), r"input\.shape must be 3 integers"),
    ("input-grey", _set("input.shape", [1, 64, 64]), r"input\.shape must be \[3, H, W\]"),
    ("input-huge", _set("input.shape", [3, 10**6, 64]), r"input\.shape must be 3 integers in 1\.\.8192"),
    ("input-list", _set("input", [3, 64, 64]), r"manifest input must be an object"),
    ("family", _set("family", "jpeg"), r"manifest family must be 'fp' or 'mshp'"),
    ("fingerprint-short", _set("fingerprint", "abc"), r"manifest fingerprint must be 64 hex digits"),
    ("fingerprint-int", _set("fingerprint", 5), r"manifest fingerprint must be 64 hex digits"),
    ("engines-list", _set("engines", []), r"manifest engines must be an object"),
    ("engine-escape", _set("engines", {"k": {"file": "../../x.engine"}}), r"outside the bundle"),
    ("class-names", _set("model", {"class_names": "cat"}), r"model\.class_names must be a list of strings"),
    ("model-str", _set("model", "tiny"), r"manifest model must be an object"),
]


@pytest.mark.parametrize(("mutate", "match"), [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES])
def test_malformed_manifest_is_a_bundle_error_naming_the_key(mshp_copy, mutate, match):
    mp = mshp_copy / "manifest.json"
    m = json.loads(mp.read_text())
    mutate(m)
    mp.write_text(json.dumps(m))
    with pytest.raises(BundleError, match=match):
        load_bundle(mshp_copy)


def test_manifest_that_is_not_an_object(mshp_copy):
    (mshp_copy / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="not a splitbits bundle manifest"):
        load_bundle(mshp_copy)


def test_manifest_symlinked_out_of_the_bundle(mshp_copy, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(mshp_copy / "manifest.json", outside)  # a valid manifest, just not inside the bundle
    (mshp_copy / "manifest.json").symlink_to(outside)
    with pytest.raises(BundleError, match=r"manifest\.json is a symbolic link"):
        load_bundle(mshp_copy)


def test_listed_file_symlinked_even_inside_the_bundle(mshp_copy):
    (mshp_copy / "tail.onnx").rename(mshp_copy / "tail.real")
    (mshp_copy / "tail.onnx").symlink_to("tail.real")
    with pytest.raises(BundleError, match=r"tail\.onnx is a symbolic link"):
        load_bundle(mshp_copy)


def test_listed_file_reached_through_a_directory_link_out_of_the_bundle(mshp_copy, tmp_path):
    shutil.move(mshp_copy / "golden", tmp_path / "golden")
    (mshp_copy / "golden").symlink_to(tmp_path / "golden")
    with pytest.raises(BundleError, match=r"'golden/golden\.npz' points outside the bundle"):
        load_bundle(mshp_copy)


def test_listed_file_that_is_a_fifo_or_a_directory(mshp_copy):
    import os

    (mshp_copy / "golden" / "golden.npz").unlink()
    os.mkfifo(mshp_copy / "golden" / "golden.npz")  # reading it would block forever
    with pytest.raises(BundleError, match=r"golden/golden\.npz is not a regular file"):
        load_bundle(mshp_copy)
    (mshp_copy / "golden" / "golden.npz").unlink()
    (mshp_copy / "golden" / "golden.npz").mkdir()
    with pytest.raises(BundleError, match=r"golden/golden\.npz is not a regular file"):
        load_bundle(mshp_copy)


def test_manifest_that_is_a_fifo_or_a_directory(mshp_copy):
    import os

    (mshp_copy / "manifest.json").unlink()
    os.mkfifo(mshp_copy / "manifest.json")
    with pytest.raises(BundleError, match=r"manifest\.json is not a regular file"):
        load_bundle(mshp_copy)


def test_bundle_path_that_is_a_file(mshp_copy):
    with pytest.raises(BundleError, match="is not a directory"):
        load_bundle(mshp_copy / "manifest.json")


@pytest.mark.parametrize(("key", "value", "match"), [
    ("y_cdf", np.array([["x"]]), r"array 'y_cdf' must be finite numbers"),
    ("scale_bound", np.array("x"), r"array 'scale_bound' must be one number"),
    ("precision", np.array([16, 16]), r"array 'precision' must be one number"),
    ("z_medians", np.full(8, np.nan, np.float32), r"array 'z_medians' must be finite numbers"),
])
def test_malformed_codec_tables_with_valid_hashes(mshp_copy, key, value, match):
    """Someone who can write the bundle can also fix its hashes: the tables are checked all the same."""
    from splitbits.runtime.bundle import fingerprint_of, sha256_file

    codec = mshp_copy / "codec.npz"
    arrays = dict(np.load(codec))
    arrays[key] = value
    np.savez(codec, **arrays)
    mp = mshp_copy / "manifest.json"
    m = json.loads(mp.read_text())
    m["files"]["codec.npz"] = {"sha256": sha256_file(codec), "bytes": codec.stat().st_size}
    m["fingerprint"] = fingerprint_of(m["files"])
    mp.write_text(json.dumps(m))
    with pytest.raises(BundleError, match=match):
        load_bundle(mshp_copy)
