"""Threat models, EOT, projection, defences and the runner, on tiny untrained models (few steps)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from support import make_student, textured_images  # noqa: E402

from splitbits.attacks.defence import (  # noqa: E402
    DefenceConfig,
    apply_defence,
    object_mask,
    total_variation,
    tv_denoise,
    tv_gradient,
)
from splitbits.attacks.model_ops import eot_rate, likelihood_mask, split_forward  # noqa: E402
from splitbits.attacks.threats import (  # noqa: E402
    THREATS,
    AttackConfig,
    AttackConfigError,
    dct_matrix,
    lowpass,
    parse_eps,
    project,
    run_attack,
)


@pytest.fixture(scope="module")
def models():
    from splitbits.trainer.models import ModelSpec, build_model

    out = {}
    for fam in ("fp", "mshp"):
        torch.manual_seed(0)
        m = build_model(ModelSpec(arch="tiny", family=fam, num_classes=12, input_size=64)).eval()
        m.update_entropy_tables(force=True)
        for p in m.parameters():
            p.requires_grad_(False)
        out[fam] = m
    return out


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.from_numpy(textured_images(4).transpose(0, 3, 1, 2).copy()).float() / 255


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_student(tmp_path_factory.mktemp("attack_student"))


def _within(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> bool:
    d = (x_adv.double() - x.double()).abs().max().item()
    return d <= eps and x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


# -- model ops -------------------------------------------------------------------------------


@pytest.mark.parametrize("fam", ["fp", "mshp"])
def test_split_forward_matches_model(models, x, fam: str) -> None:
    m = models[fam]
    out = split_forward(m, x, "round", logits=True)
    assert torch.allclose(out.rate(), m.rate_bits(x), rtol=1e-5)
    assert torch.allclose(out.logits, m(x), atol=1e-5)
    assert out.y_bit_map.shape[0] == 4 and out.y_bit_map.ndim == 3


def test_eot_shape_and_average(models, x) -> None:
    m = models["mshp"]
    torch.manual_seed(0)
    many = split_forward(m, x, "noise", samples=5)
    assert many.bits["y"].shape == (20,) and many.y_bit_map.shape[0] == 20
    torch.manual_seed(0)
    r = eot_rate(m, x, samples=5)
    assert r.shape == (4,)
    assert torch.allclose(r, many.rate().view(5, 4).mean(0))
    # sharing the analysis transform equals running repeated images through the whole model
    torch.manual_seed(1)
    shared = split_forward(m, x, "noise", samples=3).rate()
    torch.manual_seed(1)
    rep = split_forward(m, x.repeat(3, 1, 1, 1), "noise").rate()
    assert torch.allclose(shared, rep, rtol=1e-4)
    # the EOT estimate concentrates: its spread over repeats shrinks with more samples
    few = torch.stack([eot_rate(m, x, samples=1) for _ in range(8)]).std(0).mean()
    lots = torch.stack([eot_rate(m, x, samples=32) for _ in range(8)]).std(0).mean()
    assert lots < few
    with pytest.raises(ValueError):
        split_forward(m, x, "round", samples=2)


def test_likelihood_mask(models, x) -> None:
    mk = likelihood_mask(models["mshp"], x)
    assert mk.shape == (4, 1, 64, 64)
    assert mk.min() >= 0 and mk.max() <= 1 and float(mk.flatten(1).max(1).values.min()) == pytest.approx(1.0)


# -- threats ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [t for t in THREATS if t != "clean"])
@pytest.mark.parametrize("eps", [2 / 255, 8 / 255])
def test_budget_respected_exactly(models, x, name: str, eps: float) -> None:
    cfg = AttackConfig(name=name, eps=eps, steps=2, eot=2, defence={"iterations": 3})
    o = run_attack(models["mshp"], x, cfg, labels=torch.arange(4), generator=torch.Generator().manual_seed(0))
    assert o.x_adv.shape == x.shape
    assert _within(o.x_adv, x, eps)


@settings(max_examples=40, deadline=None)
@given(eps=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1), scale=st.floats(0.0, 3.0))
def test_project_is_exact(eps: float, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, 3, 8, 8, generator=g)
    xa = x0 + scale * (torch.rand(2, 3, 8, 8, generator=g) * 2 - 1)
    assert _within(project(xa, x0, eps), x0, eps)


def test_pgd_e_raises_surrogate(models, x) -> None:
    for fam in ("fp", "mshp"):
        m = models[fam]
        cfg = AttackConfig(name="pgd-e", eps=8 / 255, steps=4, eot=2)
        o = run_attack(m, x, cfg, generator=torch.Generator().manual_seed(0))
        assert o.loss_rose
        with torch.no_grad():
            assert split_forward(m, o.x_adv, "round").rate().mean() > split_forward(m, x, "round").rate().mean()
        assert len(o.history) == cfg.steps + 1


def test_rate_terms_selectable(models, x) -> None:
    m = models["mshp"]
    for terms in (("y",), ("z",)):
        o = run_attack(m, x, AttackConfig(name="pgd-e", eps=8 / 255, steps=3, eot=2, terms=terms),
                       generator=torch.Generator().manual_seed(0))
        assert o.loss_rose


def test_pgd_acc_raises_cross_entropy(models, x) -> None:
    o = run_attack(models["mshp"], x, AttackConfig(name="pgd-acc", eps=16 / 255, steps=4, eot=1),
                   labels=torch.tensor([0, 1, 2, 3]), generator=torch.Generator().manual_seed(0))
    assert o.objective == "cross_entropy" and o.loss_rose
    with pytest.raises(AttackConfigError, match="labels"):
        run_attack(models["mshp"], x, AttackConfig(name="pgd-acc", eps=0.01, steps=1))


def test_noise_is_sign_noise(models, x) -> None:
    eps = 4 / 255
    xm = x.clamp(0.1, 0.9)  # away from the clipping bounds: every pixel moves by exactly ±ε
    o = run_attack(models["mshp"], xm, AttackConfig(name="noise", eps=eps), generator=torch.Generator().manual_seed(0))
    d = (o.x_adv.double() - xm.double()).abs()
    assert torch.allclose(d, torch.full_like(d, eps), atol=1e-6)
    pos = float(((o.x_adv - xm) > 0).double().mean())
    assert 0.45 < pos < 0.55
    o2 = run_attack(models["mshp"], xm, AttackConfig(name="noise", eps=eps),
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(o.x_adv, o2.x_adv)


def test_zero_eps_and_clean(models, x) -> None:
    for name in ("pgd-e", "clean"):
        o = run_attack(models["mshp"], x, AttackConfig(name=name, eps=0.0))
        assert torch.equal(o.x_adv, x)


def test_lowpass(x) -> None:
    d = dct_matrix(16)
    assert torch.allclose(d @ d.T, torch.eye(16), atol=1e-5)
    lp = lowpass(x, 0.25)
    c = dct_matrix(64) @ lp @ dct_matrix(64).T
    assert c[..., 16:, :].abs().max() < 1e-3 and c[..., :, 16:].abs().max() < 1e-3
    assert torch.allclose(lowpass(lp, 0.25), lp, atol=1e-4)


def test_lowfreq_perturbation_is_smooth(models, x) -> None:
    eps = 8 / 255
    lf = run_attack(models["mshp"], x, AttackConfig(name="pgd-e-lowfreq", eps=eps, steps=3, eot=2, band=0.125),
                    generator=torch.Generator().manual_seed(0))
    pg = run_attack(models["mshp"], x, AttackConfig(name="pgd-e", eps=eps, steps=3, eot=2),
                    generator=torch.Generator().manual_seed(0))
    assert lf.loss_rose
    assert total_variation(lf.x_adv - x).mean() < 0.5 * total_variation(pg.x_adv - x).mean()


def test_bpda_gradients_flow(models, x) -> None:
    m = models["mshp"]
    for grad in ("bpda", "unroll"):
        xa = x.clone().requires_grad_(True)
        y = apply_defence(m, xa, DefenceConfig(name="oatv", iterations=5), grad=grad)
        (g,) = torch.autograd.grad(eot_rate(m, y, samples=2).sum(), xa)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    xa = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(apply_defence(m, xa, "jpeg", grad="bpda").sum(), xa)
    assert torch.allclose(g, torch.ones_like(g))  # identity backward
    o = run_attack(m, x, AttackConfig(name="pgd-e-bpda", eps=8 / 255, steps=2, eot=2, defence={"iterations": 5}),
                   generator=torch.Generator().manual_seed(0))
    assert o.loss_rose and "oatv" in o.objective


def test_region_attack(models, x) -> None:
    o = run_attack(models["mshp"], x, AttackConfig(name="pgd-e-region", eps=8 / 255, steps=2, eot=2),
                   generator=torch.Generator().manual_seed(0))
    assert o.loss_rose and o.objective.startswith("object_weighted")


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "pgd-x"}, "unknown attack"),
    ({"name": "pgde"}, "did you mean 'pgd-e'"),
    ({"eps": 1.5}, "outside"),
    ({"eps": -0.1}, "outside"),
    ({"eps": math.nan}, "outside"),
    ({"steps": -1}, "steps"),
    ({"eot": 0}, "eot"),
    ({"terms": ("w",)}, "rate terms"),
    ({"band": 0.0}, "band"),
    ({"through": "median"}, "unknown defence"),
    ({"step_size": -1.0}, "step_size"),
])
def test_bad_attack_configs(kwargs: dict, match: str) -> None:
    with pytest.raises(AttackConfigError, match=match):
        AttackConfig(**kwargs)


def test_parse_eps() -> None:
    assert parse_eps("8") == pytest.approx(8 / 255)
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps("0.5", "unit") == 0.5
    for bad, unit in (("300", "255"), ("-1", "255"), ("1.5", "unit"), ("abc", "255"), ("1/0", "255")):
        with pytest.raises(AttackConfigError):
            parse_eps(bad, unit)


# -- defence ---------------------------------------------------------------------------------


def test_tv_gradient_matches_autograd() -> None:
    xx = torch.rand(2, 3, 9, 7, requires_grad=True)
    (g,) = torch.autograd.grad(total_variation(xx, 0.1).sum(), xx)
    assert torch.allclose(g, tv_gradient(xx.detach(), 0.1), atol=1e-5)
    from splitbits.attacks.defence import _tv_gradient_

    assert torch.allclose(_tv_gradient_(xx.detach(), 0.1), g, atol=1e-5)


@pytest.mark.parametrize("name", ["oatv", "tv"])
def test_defence_reduces_tv(models, x, name: str) -> None:
    noisy = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    d = apply_defence(models["mshp"], noisy, name)
    assert d.shape == x.shape and d.min() >= 0 and d.max() <= 1
    assert (total_variation(d) < 0.8 * total_variation(noisy)).all()


def test_defence_paths_agree_and_mask(models, x) -> None:
    m = models["mshp"]
    mk = object_mask(m, x, floor=0.2)
    assert mk.shape == (4, 1, 64, 64) and mk.min() >= 0.2 - 1e-6 and mk.max() <= 1 + 1e-6
    fast = tv_denoise(x, mk, 10, 0.1, 0.15, 0.1)
    graph = tv_denoise(x.clone().requires_grad_(True), mk, 10, 0.1, 0.15, 0.1)
    assert torch.allclose(fast, graph.detach(), atol=1e-5)
    # object (expensive, m small) positions move less than background (m large) ones
    sharp = object_mask(m, x, 0.0, 4.0)
    moved = (tv_denoise(x, sharp, 3, 0.1, 0.15, 0.1) - x).abs().mean(1, keepdim=True)
    assert moved[sharp < 0.05].mean() < moved[sharp > 0.8].mean()
    assert torch.equal(apply_defence(m, x, "none"), x)
    j = apply_defence(m, x, DefenceConfig(name="jpeg", quality=50))
    assert j.shape == x.shape and not torch.equal(j, x)


def test_defence_config_parse() -> None:
    d = DefenceConfig.parse("oatv:iterations=50,lam=0.2")
    assert d.iterations == 50 and d.lam == 0.2 and d.alpha == 0.15
    assert DefenceConfig.parse({"name": "jpeg", "quality": 60}).label == "jpeg60"
    for bad, match in (("median", "unknown defence"), ("oatv:lamda=0.1", "did you mean 'lam'"),
                       ("oatv:iterations", "KEY=VALUE"), ("jpeg:quality=0", "quality")):
        with pytest.raises(ValueError, match=match):
            DefenceConfig.parse(bad)


# -- runner: real bytes from the runtime -------------------------------------------------------


def test_runner_real_bytes_rise(student) -> None:
    from splitbits.attacks.defence import DefenceConfig as D
    from splitbits.attacks.runner import RuntimeMeter, evaluate_point, resolve_target
    from splitbits.attacks.threats import CLEAN, ThreatPoint

    ckpt, bundle = student
    t = resolve_target(bundle)
    assert t.checkpoint == ckpt and t.family == "mshp" and t.beta == 0.16
    imgs = textured_images(6, seed=1)
    labels = np.arange(6, dtype=np.int64)
    meter = RuntimeMeter(t.bundle)
    defs = [D(name="none"), D(name="oatv", iterations=10)]
    clean = evaluate_point(t, meter, imgs, labels, CLEAN, defs)
    att = evaluate_point(t, meter, imgs, labels,
                         ThreatPoint(attack=AttackConfig(name="pgd-e", eps=8 / 255, steps=5, eot=2)), defs,
                         keep_inputs=True, batch=4)
    cb, ab = clean.defended["none"].bytes, att.defended["none"].bytes
    assert ab.mean() > cb.mean()  # real packet bytes, not the surrogate
    assert att.defended["none"].surrogate_bytes.mean() > clean.defended["none"].surrogate_bytes.mean()
    assert att.attack["loss_rose"] and att.attack["linf_levels"] <= 8
    assert att.inputs is not None and att.inputs.dtype == np.uint8
    assert np.abs(att.inputs.astype(int) - imgs.astype(int)).max() <= 8
    assert set(att.defended) == {"none", "oatv(iterations=10)"}
    assert att.defended["oatv(iterations=10)"].defence_ms > 0
    # bytes equal len(packet) of the runtime for the same inputs
    pk, _ = meter.packets(att.inputs)
    assert [len(p) for p in pk] == att.defended["none"].bytes.tolist()


def test_to_uint8_within() -> None:
    from splitbits.attacks.runner import to_uint8_within

    clean = np.full((1, 4, 4, 3), 100, np.uint8)
    x = torch.full((1, 3, 4, 4), (100 + 7.9) / 255)
    assert to_uint8_within(x, clean, 7.65 / 255).max() == 107  # never rounds past ⌊255·ε⌋


def test_resolve_target_errors(student, tmp_path) -> None:
    from splitbits.attacks.runner import TargetError, resolve_target

    with pytest.raises(TargetError, match="no such"):
        resolve_target(tmp_path / "missing.pt")
    with pytest.raises(TargetError, match="not a bundle"):
        resolve_target(tmp_path)
    other, _ = make_student(tmp_path, seed=1)
    with pytest.raises(TargetError, match="does not match"):
        resolve_target(student[1], checkpoint=other)
