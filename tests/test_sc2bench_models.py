"""sc2bench checkpoints (a bare ``{"model": state_dict}``, no spec) in every command that takes a model:
``export``, ``attack``, ``bench attack`` and campaigns, given --arch/--family (campaign: arch/family keys),
or through the bundle exported from them (its manifest holds the spec, the checkpoint path and its sha256)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from splitbits.runtime.cli import main  # noqa: E402

SPEC_ARGS = ["--arch", "tiny", "--family", "mshp", "--num-classes", "10", "--input-size", "64"]


@pytest.fixture(scope="module")
def _module_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _private_cache(_module_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITBITS_CACHE", str(_module_cache))  # shared: the checkpoint is exported once


@pytest.fixture(scope="module")
def sc2bench(tiny_models, tmp_path_factory):
    """(checkpoint, bundle): the tiny MSHP student saved as sc2bench does, and its export by the CLI."""
    root = tmp_path_factory.mktemp("sc2bench")
    ckpt = root / "student.pt"
    torch.save({"model": tiny_models["mshp"].state_dict(), "optimizer": {}, "best_value": 0.5}, ckpt)
    assert main(["export", str(ckpt), *SPEC_ARGS, "--out", str(root / "bundle"), "--golden", "4"]) == 0
    return ckpt, root / "bundle"


def _one_error(capsys: pytest.CaptureFixture, rc: int) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("INFO", "WARNING"))]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_export_records_the_checkpoint_and_its_sha256(sc2bench, tiny_models):
    from splitbits.runtime.bundle import load_manifest, sha256_file

    ckpt, bundle = sc2bench
    m = load_manifest(bundle)
    assert m["source"] == str(ckpt) and m["source_sha256"] == sha256_file(ckpt)
    assert m["model"] == tiny_models["mshp"].spec.to_dict()


def test_attack_takes_the_bundle_alone_or_the_checkpoint_with_its_spec(sc2bench, tmp_path, capsys):
    ckpt, bundle = sc2bench
    common = ["--attack", "pgd-e", "--eps", "8", "--steps", "2", "--eot", "2", "--limit", "3", "--no-progress"]
    assert main(["attack", str(bundle), *common, "--json", str(tmp_path / "b.json")]) == 0
    by_bundle = json.loads((tmp_path / "b.json").read_text())
    assert by_bundle["target"]["checkpoint"] == str(ckpt) and by_bundle["checks"]["linf_within_eps"]
    assert main(["attack", str(ckpt), *SPEC_ARGS, *common, "--json", str(tmp_path / "c.json")]) == 0
    by_ckpt = json.loads((tmp_path / "c.json").read_text())
    assert by_ckpt["target"]["bundle"] != str(bundle)  # exported once to the cache
    same = [r["results"]["clean"]["none"]["per_image"]["bytes"] for r in (by_ckpt, by_bundle)]
    assert same[0] == same[1]  # the same model
    capsys.readouterr()
    line = _one_error(capsys, main(["attack", str(ckpt), *common]))
    assert "no model spec" in line and "--arch" in line and "bundle exported from it" in line
    assert "--family needs --arch" in _one_error(capsys, main(["attack", str(ckpt), "--family", "mshp", *common]))
    assert "give --arch and --family" in _one_error(capsys, main(["attack", str(ckpt), "--num-classes", "10",
                                                                  *common]))


def test_bundle_whose_checkpoint_changed_is_refused(sc2bench, tmp_path, capsys):
    ckpt, bundle = sc2bench
    moved = tmp_path / "bundle"
    shutil.copytree(bundle, moved)
    other = tmp_path / ckpt.name  # the manifest's relative fallback: the bundle's folder, same name
    sd = torch.load(ckpt, weights_only=True)
    sd["best_value"] = 0.25
    torch.save(sd, other)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["source"] = ckpt.name
    (moved / "manifest.json").write_text(json.dumps(manifest))
    line = _one_error(capsys, main(["attack", str(moved), "--attack", "noise", "--limit", "2", "--no-progress"]))
    assert "sha256 differs" in line and "--checkpoint" in line


def test_bench_attack_on_the_bundle_and_on_the_checkpoint(sc2bench, tmp_path, capsys):
    ckpt, bundle = sc2bench
    fast = ["--images", "2", "--loop-images", "1", "--steps", "1", "--eot", "1", "--skip-sequential"]
    for name, model in (("b", [str(bundle)]), ("c", [str(ckpt), *SPEC_ARGS])):
        assert main(["bench", "attack", "--checkpoint", *model, *fast, "--json", str(tmp_path / f"{name}.json")]) == 0
        res = json.loads((tmp_path / f"{name}.json").read_text())
        assert res["settings"]["input"] == [3, 64, 64] and res["batched"]["images_per_s"] > 0
    capsys.readouterr()
    assert "no model spec" in _one_error(capsys, main(["bench", "attack", "--checkpoint", str(ckpt), *fast]))
    assert "give --checkpoint too" in _one_error(capsys, main(["bench", "attack", *SPEC_ARGS, *fast]))


def _campaign(tmp: Path, models: str) -> Path:
    cfg = tmp / "c.yaml"
    cfg.write_text(f"name: sc2\nout: {tmp / 'out'}\nmodels:\n{models}dataset: builtin\nlimit: 2\nchunk: 2\n"
                   "threats:\n  - {name: pgd-e, eps: [8], steps: 1, eot: 1}\n")
    return cfg


def test_campaign_takes_the_bundle_and_the_checkpoint_with_spec_keys(sc2bench, tmp_path, capsys):
    import sqlite3

    ckpt, bundle = sc2bench
    models = (f"  - {bundle}\n"
              f"  - {{checkpoint: {ckpt}, arch: tiny, family: mshp, num_classes: 10, input_size: 64, name: ck}}\n")
    assert main(["campaign", str(_campaign(tmp_path, models)), "--no-progress"]) == 0
    with sqlite3.connect(tmp_path / "out" / "results.sqlite") as db:
        models_stored = {r[0] for r in db.execute("SELECT DISTINCT model_id FROM results")}
    assert len(models_stored) == 2
    capsys.readouterr()
    bad = f"  - {{checkpoint: {ckpt}, family: mshp}}\n"
    line = _one_error(capsys, main(["campaign", str(_campaign(tmp_path, bad)), "--dry-run"]))
    assert "models[0]: family needs arch" in line
    line = _one_error(capsys, main(["campaign", str(_campaign(tmp_path, f"  - {ckpt}\n")), "--no-progress"]))
    assert "no model spec" in line
