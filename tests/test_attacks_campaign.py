"""Campaigns (config checks, row-by-row storage, resume, shards, reports) and the attack/bench CLIs."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("torch")

from support import make_student, textured_images

from splitbits.attacks import campaign as camp
from splitbits.attacks.campaign import CampaignError, load_campaign, parse_campaign, plan_units, run_campaign
from splitbits.runtime.cli import main as cli_main
from splitbits.runtime.datasets import DatasetError


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_student(tmp_path_factory.mktemp("campaign_student"))


def _config(student, **over) -> dict:
    ckpt, bundle = student
    cfg = {
        "name": "t",
        "models": [{"checkpoint": str(ckpt), "bundle": str(bundle)}],
        "limit": 6, "chunk": 3, "batch": 3, "threads": 1, "device": "cpu",
        "threats": [{"name": "pgd-e", "eps": [8], "steps": 2, "eot": 2}, {"name": "noise", "eps": [8]}],
        "corruptions": {"names": ["contrast"], "severities": [2]},
        "defences": ["none", {"name": "oatv", "iterations": 5}],
    }
    cfg.update(over)
    return cfg


# -- config validation -----------------------------------------------------------------------


@pytest.mark.parametrize("patch,match", [
    ({"threatz": []}, "unknown key 'threatz' \\(did you mean 'threats'\\?\\)"),
    ({"threats": [{"name": "pgd-e", "eps": [8], "step": 3}]}, "did you mean 'steps'"),
    ({"threats": [{"name": "pgd-f", "eps": [8]}]}, "unknown attack"),
    ({"threats": [{"name": "gaussian_noise"}]}, "is a corruption"),
    ({"threats": [{"name": "pgd-e", "eps": [300]}]}, "outside"),
    ({"threats": [{"name": "pgd-e", "eps": [2], "eps_unit": 1}]}, "unknown key"),
    ({"eps_unit": "unit", "threats": [{"name": "pgd-e", "eps": [1.5]}]}, "outside"),
    ({"threats": [{"name": "pgd-e"}]}, "needs eps"),
    ({"corruptions": {"names": ["fogg"], "severities": [1]}}, "did you mean 'fog'"),
    ({"corruptions": {"names": ["fog"], "severities": [6]}}, "1..5"),
    ({"corruptions": {"names": ["fog"], "severity": [1]}}, "unknown key"),
    ({"defences": ["none", "median"]}, "unknown defence"),
    ({"defences": [{"name": "oatv", "lamda": 0.1}]}, "did you mean 'lam'"),
    ({"defences": ["oatv", {"name": "oatv"}]}, "listed twice"),
    ({"limit": 0}, "limit must be"),
    ({"limit": "ten"}, "limit must be int"),
    ({"models": []}, "at least one"),
    ({"models": ["/nonexistent/x.pt"]}, "not found"),
])
def test_config_errors_before_work(student, tmp_path, monkeypatch, capsys, patch: dict, match: str) -> None:
    calls = []
    monkeypatch.setattr("splitbits.attacks.campaign.evaluate_point", lambda *a, **k: calls.append(1))
    with pytest.raises(CampaignError, match=match):
        parse_campaign(_config(student, **patch))
    # the same config through the CLI: a one-line error, no output folder, no unit evaluated
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_config(student, **patch)))
    assert cli_main(["campaign", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not calls and not (tmp_path / "out").exists()


def test_config_file_and_example(tmp_path, student) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_config(student)))
    c = load_campaign(p)
    assert [pt.threat for pt in c.points] == ["clean", "pgd-e", "noise", "corruption"]  # clean added
    assert [d.label for d in c.defences] == ["none", "oatv(iterations=5)"]
    assert len(plan_units(c)) == 4 * 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(CampaignError, match="not valid YAML"):
        load_campaign(bad)
    shipped = sorted((Path(camp.__file__).parent / "campaigns").glob("*.yaml"))
    assert {p.name for p in shipped} >= {"example.yaml", "targets.yaml"}
    for path in shipped:  # every shipped config is valid (with a model that exists here)
        raw = yaml.safe_load(path.read_text())
        raw["models"] = [str(student[0])]
        parse_campaign(raw)
    raw = yaml.safe_load((Path(camp.__file__).parent / "campaigns" / "example.yaml").read_text())
    raw["models"] = [str(student[0])]
    c = parse_campaign(raw)
    assert {p.threat for p in c.points} >= {"clean", "pgd-e", "pgd-acc", "noise", "pgd-e-lowfreq", "pgd-e-region",
                                             "pgd-e-bpda", "corruption"}
    assert sum(p.threat == "corruption" for p in c.points) == 19 * 5


def test_empty_dataset_is_an_error_before_work(student, tmp_path, monkeypatch) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    calls = []
    monkeypatch.setattr("splitbits.attacks.campaign.evaluate_point", lambda *a, **k: calls.append(1))
    c = parse_campaign(_config(student, dataset=f"imagefolder:{tmp_path / 'empty'}"))
    with pytest.raises(DatasetError, match=r"(?i)no images|empty|not found"):
        run_campaign(c, tmp_path / "out", progress=False)
    assert not calls


# -- running, resuming, sharding -------------------------------------------------------------


def _rows(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT row_key, created FROM results ORDER BY row_key").fetchall()
    finally:
        con.close()


@pytest.mark.slow
def test_resume_after_interruption(student, tmp_path) -> None:
    c = parse_campaign(_config(student))
    out = tmp_path / "run"
    total_units = len(plan_units(c))

    def interrupt(unit, n):
        if n == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_campaign(c, out, progress=False, on_unit=interrupt)
    first = _rows(out / "results.sqlite")
    assert len(first) == 3 * len(c.defences)  # every finished unit is stored, nothing else

    seen = []
    s = run_campaign(c, out, progress=False, on_unit=lambda u, n: seen.append(u))
    assert s["computed"] == total_units - 3 and s["skipped"] == 3 and len(seen) == total_units - 3
    rows = _rows(out / "results.sqlite")
    assert len(rows) == total_units * len(c.defences) == len({r[0] for r in rows})
    assert set(first) <= set(rows)  # the stored rows were not redone (same timestamps)
    again = run_campaign(c, out, progress=False)
    assert again["computed"] == 0 and len(_rows(out / "results.sqlite")) == len(rows)
    for f in ("report.md", "report.html", "report.json", "bytes_vs_eps.png", "accuracy_vs_eps.png",
              "corruptions.png"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    pts = {(p["threat"], p["defence"]): p for p in rep["points"]}
    assert pts[("clean", "none")]["delta_bytes_pct"] == 0.0
    assert pts[("pgd-e", "none")]["n"] == 6 and pts[("pgd-e", "none")]["loss_rose"] is True
    md = (out / "report.md").read_text()
    assert "Clean / attacked / defended (oatv(iterations=5))" in md and "pgd-e" in md

    # a different frame (limit) in the same folder is refused
    with pytest.raises(CampaignError, match="different dataset"):
        run_campaign(parse_campaign(_config(student, limit=5)), out, progress=False)
    # --fresh starts over
    fresh = run_campaign(c, out, progress=False, fresh=True)
    assert fresh["computed"] == total_units


@pytest.mark.slow
def test_shards_cover_the_grid_once(student, tmp_path) -> None:
    c = parse_campaign(_config(student, threats=[{"name": "noise", "eps": [4, 8]}], corruptions=None))
    out = tmp_path / "sharded"
    s1 = run_campaign(c, out, progress=False, shard="1/2")
    assert "report" not in s1  # shard 0 has not finished yet
    s0 = run_campaign(c, out, progress=False, shard="0/2")
    total = len(plan_units(c))
    assert s0["computed"] + s1["computed"] == total and s0["computed"] > 0 and s1["computed"] > 0
    assert "report" in s0  # the last shard to finish writes the report
    rows = _rows(out / "results.sqlite")
    assert len(rows) == total * len(c.defences) == len({r[0] for r in rows})
    with pytest.raises(CampaignError, match="0 <= I < N"):
        camp.parse_shard("2/2")
    with pytest.raises(CampaignError, match="I/N"):
        camp.parse_shard("two")
    # a store that a shard on another host wrote is refused to shards (SQLite's WAL needs one host)
    con = sqlite3.connect(out / "results.sqlite")
    con.execute("UPDATE shards SET host='node-b' WHERE rank=1")
    con.commit()
    con.close()
    with pytest.raises(CampaignError, match=r"ran on node-b.*one host.*--ray"):
        run_campaign(c, out, progress=False, shard="0/2")


# -- CLI -------------------------------------------------------------------------------------


def test_attack_cli_json_and_save_inputs(student, tmp_path, capsys) -> None:
    _, bundle = student
    js, npz = tmp_path / "a.json", tmp_path / "adv.npz"
    rc = cli_main(["attack", str(bundle), "--attack", "pgd-e", "--eps", "8", "--steps", "2", "--eot", "2",
                   "--limit", "4", "--defence", "oatv:iterations=5", "--threads", "1", "--json", str(js),
                   "--save-inputs", str(npz), "--no-progress"])
    assert rc == 0
    r = json.loads(js.read_text())
    assert r["checks"]["loss_rose"] is True and r["checks"]["linf_within_eps"] is True
    assert set(r["results"]["attacked"]) == {"none", "oatv(iterations=5)"}
    att = r["results"]["attacked"]["none"]
    assert att["bytes_mean"] == pytest.approx(np.mean(att["per_image"]["bytes"]))
    assert "surrogate_bytes_mean" in att and "loadavg_1_5_15" in r["machine"]
    with np.load(npz) as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (4, 64, 64, 3)
        assert z["labels"].shape == (4,)
        assert np.abs(z["images"].astype(int) - z["clean_images"].astype(int)).max() <= 8


def test_attack_cli_corruption(student, tmp_path) -> None:
    _, bundle = student
    js = tmp_path / "c.json"
    assert cli_main(["attack", str(bundle), "--attack", "shot_noise", "--severity", "2", "--limit", "3",
                     "--json", str(js), "--no-progress"]) == 0
    r = json.loads(js.read_text())
    assert r["threat"] == "corruption" and r["corruption"] == "shot_noise" and r["severity"] == 2


@pytest.mark.parametrize("args,match", [
    (["--attack", "pgd-q"], "unknown attack"),
    (["--attack", "pgd-e", "--eps", "300"], "outside"),
    (["--attack", "pgd-e", "--eps", "-2"], "outside"),
    (["--attack", "pgd-e", "--eps", "1.5", "--eps-unit", "unit"], "outside"),
    (["--attack", "corruption", "--corruption", "fogg"], "did you mean 'fog'"),
    (["--attack", "corruption"], "needs --corruption"),
    (["--attack", "fog", "--severity", "9"], "1..5"),
    (["--defence", "median"], "unknown defence"),
    (["--limit", "0"], "limit"),
])
def test_attack_cli_bad_input(student, capsys, monkeypatch, args: list, match: str) -> None:
    monkeypatch.setattr("splitbits.attacks.runner.evaluate_point",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("work started")))
    rc = cli_main(["attack", str(student[1]), *args, "--no-progress"])
    assert rc == 2
    assert match.replace("\\", "") in capsys.readouterr().err or pytest.fail(match)


def test_attack_cli_missing_target(tmp_path, capsys) -> None:
    assert cli_main(["attack", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint or bundle" in capsys.readouterr().err


@pytest.mark.slow
def test_campaign_cli(student, tmp_path, capsys) -> None:
    cfg = _config(student, threats=[{"name": "noise", "eps": [8]}], corruptions=None, limit=3)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert cli_main(["campaign", str(p), "--dry-run"]) == 0
    assert "units" in capsys.readouterr().out
    out = tmp_path / "o"
    assert cli_main(["campaign", str(p), "--out", str(out), "--no-progress"]) == 0
    assert (out / "report.html").is_file()
    assert json.loads((out / "run_rank0.json").read_text())["computed"] == 2  # clean + noise, one chunk each
    assert cli_main(["campaign", str(p), "--out", str(out), "--report-only"]) == 0
    cfg["threatz"] = cfg.pop("threats")
    p.write_text(yaml.safe_dump(cfg))
    assert cli_main(["campaign", str(p), "--out", str(tmp_path / "o2")]) == 2
    assert "did you mean 'threats'" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_bench_attack_cli(tmp_path) -> None:
    js = tmp_path / "b.json"
    assert cli_main(["bench", "attack", "--images", "4", "--loop-images", "2", "--batch", "4", "--steps", "2",
                     "--eot", "2", "--threads", "1", "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["batched"]["images_per_s"] > 0 and r["speedup_vs_per_image"] > 0
    assert r["batched"]["rate_attacked_bits"] > r["batched"]["rate_clean_bits"]
    assert "per_image_sequential_eot" in r and "machine" in r


@pytest.mark.slow
def test_demo_section(student, tmp_path) -> None:
    from splitbits.attacks.demo import attack_section
    from splitbits.trainer.checkpoint import load_model

    ckpt, bundle = student
    model, _ = load_model(ckpt)

    imgs = textured_images(6, seed=2)
    res = attack_section(model, bundle, imgs, np.arange(6, dtype=np.int64) % 12, tmp_path, progress=False,
                         n_images=4, steps=2, eot=2)
    assert "| clean |" in res["markdown"] and (tmp_path / res["plot"]).is_file()
    json.dumps(res)
    assert [r["input"] for r in res["rows"]][:4] == ["clean", "PGD-E ε=8/255", "PGD-Acc ε=8/255", "noise ±8/255"]
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_pregenerated_imagenet_c_layout(student, tmp_path) -> None:
    from PIL import Image

    root = tmp_path / "inc"
    imgs = textured_images(4, seed=5)
    for sev in (1, 2):
        for k, cls in enumerate(("n01", "n02")):
            d = root / "contrast" / str(sev) / cls
            d.mkdir(parents=True)
            for j in range(2):
                Image.fromarray(imgs[2 * k + j]).save(d / f"{j}.png")
    c = parse_campaign(_config(student, threats=[], limit=4, chunk=4,
                               corruptions={"names": ["contrast"], "severities": [1, 2],
                                            "source": f"imagenet-c:{root}"}))
    out = tmp_path / "o"
    s = run_campaign(c, out, progress=False)
    assert s["computed"] == 3  # clean + contrast:1 + contrast:2
    rep = json.loads((out / "report.json").read_text())
    levels = {p["level"] for p in rep["points"] if p["threat"] == "corruption"}
    assert levels == {"contrast:1", "contrast:2"}
    assert all(p["n"] == 4 for p in rep["points"])
    with pytest.raises(CampaignError, match="source"):
        parse_campaign(_config(student, corruptions={"names": ["fog"], "source": "/data/inc"}))


@pytest.mark.slow
def test_changed_config_reuses_and_reports_only_current_points(student, tmp_path) -> None:
    base = {"limit": 3, "chunk": 3, "corruptions": None, "threats": [{"name": "pgd-e", "eps": [8], "steps": 1,
                                                                      "eot": 2}]}
    out = tmp_path / "o"
    run_campaign(parse_campaign(_config(student, **base)), out, progress=False)
    base["threats"][0]["steps"] = 2  # another attack: new rows, the old ones stay stored but unreported
    s = run_campaign(parse_campaign(_config(student, **base)), out, progress=False)
    assert s["computed"] == 1 and s["skipped"] == 1  # clean is reused
    pts = json.loads((out / "report.json").read_text())["points"]
    assert sorted(p["threat"] for p in pts if p["defence"] == "none") == ["clean", "pgd-e"]
    assert all(p["n"] == 3 for p in pts)
    base["defences"] = ["none", "jpeg"]  # a defence that is not stored yet: its units run again
    s = run_campaign(parse_campaign(_config(student, **base)), out, progress=False)
    assert s["computed"] == 2
    pts = json.loads((out / "report.json").read_text())["points"]
    assert {p["defence"] for p in pts} == {"none", "jpeg75"}
