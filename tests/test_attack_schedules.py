"""PGD schedules (auto / fixed / reference), the strength comparison and the paper campaigns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")

from support import make_student, textured_images  # noqa: E402

from splitbits.attacks import campaign as camp  # noqa: E402
from splitbits.attacks.model_ops import split_forward  # noqa: E402
from splitbits.attacks.report import load_published, published_rows  # noqa: E402
from splitbits.attacks.strength import PassCounter, compare_schedules, table  # noqa: E402
from splitbits.attacks.threats import (  # noqa: E402
    AttackConfig,
    AttackConfigError,
    apgd_checkpoints,
    reference_objective,
    run_attack,
)

CAMPAIGNS = Path(camp.__file__).parent / "campaigns"


@pytest.fixture(scope="module")
def mshp():
    from splitbits.trainer.models import ModelSpec, build_model

    torch.manual_seed(0)
    m = build_model(ModelSpec(arch="tiny", family="mshp", num_classes=12, input_size=64)).eval()
    m.update_entropy_tables(force=True)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.from_numpy(textured_images(3).transpose(0, 3, 1, 2).copy()).float() / 255


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_student(tmp_path_factory.mktemp("schedule_student"))


def _deployed(m, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return split_forward(m, x, "round").rate()


def test_schedule_validation() -> None:
    assert AttackConfig().schedule == "auto"
    assert AttackConfig(schedule="reference").alpha == 0.1
    assert AttackConfig(schedule="fixed", eps=8 / 255, steps=20).alpha == pytest.approx(2.5 * 8 / 255 / 20)
    assert AttackConfig(schedule="auto", eps=8 / 255).alpha == pytest.approx(16 / 255)
    with pytest.raises(AttackConfigError, match="unknown PGD schedule 'apgd'"):
        AttackConfig(schedule="apgd")
    with pytest.raises(AttackConfigError, match="no reference version"):
        AttackConfig(name="pgd-acc", schedule="reference")


def test_apgd_checkpoints() -> None:
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert all(0 < c <= 20 for c in apgd_checkpoints(20))


def test_auto_keeps_the_best_coded_rate(mshp, x) -> None:
    eps = 8 / 255
    o = run_attack(mshp, x, AttackConfig(eps=eps, steps=6, eot=2), generator=torch.Generator().manual_seed(0))
    assert (o.x_adv - x).abs().max() <= eps and o.x_adv.min() >= 0 and o.x_adv.max() <= 1
    assert all(b >= a for a, b in zip(o.history, o.history[1:]))  # best-so-far coded rate never falls
    assert o.history[-1] == pytest.approx(float(_deployed(mshp, o.x_adv).mean()), rel=1e-5)
    assert (_deployed(mshp, o.x_adv) > _deployed(mshp, x)).all()


def test_reference_is_the_papers_procedure(mshp, x) -> None:
    """No random start (same result for any generator), eot copies per step through g_a, a mean of signed
    steps of 0.1 projected onto the ε-ball, and the y-only objective with y rounded."""
    eps, steps, copies = 4 / 255, 3, 4
    cfg = AttackConfig(eps=eps, steps=steps, eot=copies, schedule="reference")
    counter = PassCounter(mshp.bottleneck_layer.g_a)
    try:
        torch.manual_seed(1)
        a = run_attack(mshp, x, cfg, generator=torch.Generator().manual_seed(1))
    finally:
        counter.close()
    assert counter.forward == counter.backward + x.shape[0] * copies == (steps + 1) * copies * x.shape[0]
    assert (a.x_adv - x).abs().max() <= eps
    # averaged signs of ±0.1 steps: a pixel reaches the ε corner unless its copies disagree
    assert ((a.x_adv - x).abs() >= eps * 0.999).float().mean() > 0.5
    assert a.objective == "reference_mean_y_bits"
    torch.manual_seed(2)
    b = run_attack(mshp, x, cfg, generator=torch.Generator().manual_seed(2))
    assert a.x_adv.shape == b.x_adv.shape  # different noise, same procedure
    # the objective is the mean over y of −log2 p with y rounded: equals the coded y bits / elements
    f = reference_objective(mshp)(x)
    out = split_forward(mshp, x, "round")
    assert f.shape == (x.shape[0],)
    assert torch.allclose(f, out.bits["y"] / out.y_elements, rtol=0.2)


@pytest.mark.slow
def test_strength_table(student) -> None:
    from splitbits.attacks.runner import resolve_target

    ckpt, bundle = student
    target = resolve_target(ckpt, bundle=bundle)
    res = compare_schedules(target, ["builtin", "noise"], eps=8 / 255, steps=2, eot=2, limit=2, batch=2)
    for name in ("builtin", "noise"):
        st = res["sets"][name]
        assert set(st["schedules"]) == {"auto", "fixed", "reference"}
        assert 0.0 <= st["auto_ge_best_other_share"] <= 1.0
        assert st["schedules"]["reference"]["forward_images_per_image"] == 3 * 2  # (steps + 1) · copies
        for r in st["schedules"].values():
            assert len(r["bytes"]) == 2 and all(b > 0 for b in r["bytes"])
            assert r["linf_levels"] <= 8
    assert len(table(res)) == 6
    json.dumps(res)


def test_published_figures_file(tmp_path) -> None:
    data = load_published(CAMPAIGNS / "paper_published.json")
    assert "arXiv:2403.00942" in data["citation"] and data["rows"] == []  # not transcribed: explicitly empty
    rec = {"model": "m", "family": "mshp", "beta": None, "threat": "pgd-e", "level": "8/255", "defence": "none",
           "clean_bytes": 1000.0, "bytes": 1500.0, "delta_bytes_pct": 50.0, "top1": 0.5}
    pub = {"citation": "c", "rows": [{"model": "m", "family": "mshp", "threat": "pgd-e", "level": "8/255",
                                      "clean_kb": 1.0, "attacked_kb": 1.9, "delta_pct": 90.0, "top1": 70.0}]}
    (row,) = published_rows([rec], pub)
    assert row[6:] == [1.0, 1.5, "+50.0", 50.0, 1.0, 1.9, 90.0, 70.0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"citation": "c", "rows": [{"model": "m", "bytes": 3}]}))
    with pytest.raises(ValueError, match="rows\\[0\\]"):
        load_published(bad)


def test_paper_campaign_is_the_protocol(student) -> None:
    raw = yaml.safe_load((CAMPAIGNS / "paper.yaml").read_text())
    assert len(raw["models"]) == 3 * 2 * 6
    raw["models"] = [str(student[0])]
    c = camp.parse_campaign(raw)
    levels = {(p.threat, p.level) for p in c.points if p.attack is not None}
    for t in ("pgd-e", "pgd-acc", "noise"):
        assert {lv for th, lv in levels if th == t} == {"2/255", "4/255", "8/255", "16/255"}
    assert sum(p.threat == "corruption" for p in c.points) == 19 * 5
    assert c.corruption_source == "imagenet-c:imagenet-c"
    assert [d.name for d in c.defences] == ["none", "oatv"]
    assert Path(c.config["paper"]).name == "paper_published.json"


@pytest.mark.slow
def test_paper_twin_smoke(student, tmp_path) -> None:
    """The twin's grid shrunk to 2 images and 2 steps on the tiny student: runs and reports the paper columns."""
    raw = yaml.safe_load((CAMPAIGNS / "paper_twin.yaml").read_text())
    raw.update(models=[{"checkpoint": str(student[0]), "bundle": str(student[1]), "name": "tiny"}],
               image_size=None, limit=2, chunk=2, batch=2, threads=1)
    for t in raw["threats"]:
        if "steps" in t:
            t.update(steps=2, eot=2, eps=t["eps"][:2])
    raw["corruptions"]["names"] = raw["corruptions"]["names"][:1]
    raw["defences"][1]["iterations"] = 3
    c = camp.parse_campaign(raw)
    files = camp.run_campaign(c, tmp_path / "out", progress=False)["report"]
    md = Path(files["markdown"]).read_text()
    assert "Ours beside the published figures" in md and "arXiv:2403.00942" in md and "paper Δ %" in md
    rep = json.loads(Path(files["json"]).read_text())
    assert len(rep["published"]["rows"]) == len(rep["points"]) > 0
    assert np.all([r[-4:] == ["–"] * 4 for r in rep["published"]["rows"]])  # nothing published is invented
