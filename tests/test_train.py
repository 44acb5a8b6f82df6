"""Training: config validation, teacher and two-stage student smoke runs, checkpoints, resume, CLI."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from splitbits.runtime.cli import main as cli_main
from splitbits.trainer.checkpoint import load_model, read_checkpoint
from splitbits.trainer.config import (
    PAPER_BETAS,
    ConfigError,
    apply_overrides,
    list_builtin_configs,
    load_config,
    validate_config,
)
from splitbits.trainer.models import MSHPBottleneck, SplitClassifier, TeacherClassifier
from splitbits.trainer.train import FROZEN_IN_STAGE2, TrainError, kd_loss, train_student, train_teacher

SMALL_DATA = {"dataset": "builtin:seed=7&train=48&val=24", "batch_size": 16, "eval_batch_size": 24,
              "jpeg_reference_images": 4}
SMALL_MODEL = {"arch": "tiny", "tiny_widths": [8, 16, 16]}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITBITS_CACHE", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(min(2, torch.get_num_threads()))


def teacher_config(**train: Any) -> dict[str, Any]:
    return {"kind": "teacher", "model": dict(SMALL_MODEL), "data": dict(SMALL_DATA),
            "train": {"epochs": 2, "lr": 0.05, "warmup_epochs": 0.5, **train}}


def student_config(family: str, **stage: Any) -> dict[str, Any]:
    return {"kind": "student", "model": {"arch": "tiny", "family": family}, "data": dict(SMALL_DATA),
            "student": {"beta": 0.32},
            "stage1": {"epochs": 1, "schedule": "cosine", **stage},
            "stage2": {"epochs": 2, "schedule": "cosine", "lr": 0.01, **stage}}


def _epoch_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The "<stage> epoch N/M" starts of the per-epoch log lines captured so far."""
    return [m.group(0) for r in caplog.records if (m := re.match(r"\w+ epoch \d+/\d+", r.getMessage()))]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLITBITS_CACHE", str(tmp_path_factory.mktemp("tcache")))
        train_teacher(teacher_config(), out, device="cpu", progress=False)
    return out


# -- configs --------------------------------------------------------------------------------


def test_builtin_configs_validate_and_are_complete() -> None:
    names = list_builtin_configs()
    for required in ("tiny_teacher", "tiny_mshp", "tiny_fp", "resnet50_mshp", "resnet50_fp", "resnet101_mshp",
                     "resnet101_fp", "regnety_064_mshp", "regnety_064_fp"):
        assert required in names
    for name in names:
        cfg = load_config(name)
        assert cfg["kind"] in ("teacher", "student")
        if cfg["kind"] == "student":
            assert cfg["model"]["family"] in ("fp", "mshp")
            if cfg["model"]["arch"] != "tiny":
                assert cfg["data"]["dataset"] is None  # a user-given ImageNet path
                assert cfg["student"]["beta"] in PAPER_BETAS


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"kind": "teacher", "train": {"epoch": 3}}, r"unknown key train\.epoch \(did you mean 'epochs'\?\)"),
        ({"kind": "teacher", "trian": {}}, r"unknown config key 'trian' \(did you mean 'train'\?\)"),
        ({"kind": "teacher", "stage1": {}}, "does not belong in a teacher config"),
        ({"kind": "pupil"}, "kind"),
        ({"kind": "teacher", "train": {"lr": "fast"}}, r"train\.lr must be int/float"),
        ({"kind": "teacher", "train": {"epochs": 2.5}}, r"train\.epochs must be int"),
        ({"kind": "teacher", "train": {"nesterov": 1}}, r"train\.nesterov must be bool"),
        ({"kind": "teacher", "train": {"optimizer": "adamm"}}, r"did you mean 'adam'"),
        ({"kind": "teacher", "train": {"lr": -1}}, r"train\.lr must be > 0"),
        ({"kind": "teacher", "train": {"schedule": "multistep"}}, "needs train.milestones"),
        ({"kind": "teacher", "model": {"family": "mshp"}}, "model.family: null"),
        ({"kind": "student"}, "needs model.family"),
        ({"kind": "student", "model": {"family": "mshp"}, "stage2": {"alpha": 2}}, r"stage2\.alpha must be within"),
        ({"kind": "teacher", "model": {"arch": "resnet50", "tiny_widths": [8, 8, 8]}}, "only to arch: tiny"),
        ({"kind": "teacher", "data": "builtin"}, "must be a mapping"),
    ],
)
def test_config_errors(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate_config(raw)


def test_overrides() -> None:
    cfg = load_config("tiny_mshp", ["student.beta=0.32", "stage1.epochs=3", "data.val_limit=null", "seed=4",
                                    "model.bottleneck={num_bottleneck_channels: 8}"])
    assert cfg["student"]["beta"] == 0.32 and cfg["stage1"]["epochs"] == 3 and cfg["seed"] == 4
    assert cfg["data"]["val_limit"] is None
    assert cfg["model"]["bottleneck"] == {"num_bottleneck_channels": 8}
    for bad, match in [("student.bta=1", "did you mean 'beta'"), ("studnt.beta=1", "unknown section"),
                       ("beta=1", "section.key"), ("student.beta", "KEY=VALUE"), ("a.b.c=1", "section.key")]:
        with pytest.raises(ConfigError, match=match):
            apply_overrides({"kind": "student"}, [bad])
    with pytest.raises(ConfigError, match=r"student\.beta must be"):
        load_config("tiny_mshp", ["student.beta=lots"])
    with pytest.raises(ConfigError, match="neither a file nor a builtin config"):
        load_config("tiny_msph")


def test_big_configs_need_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.dataset is required"):
        train_student(load_config("resnet50_mshp"), tmp_path / "t.pt", tmp_path / "s.pt", device="cpu")


def test_kd_loss_matches_torchdistill_definition() -> None:
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    soft = torch.nn.functional.kl_div(torch.log_softmax(s / 2, 1), torch.softmax(t / 2, 1), reduction="batchmean")
    hard = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, t, y, 2.0, 0.3), 0.3 * hard + 0.7 * 4 * soft)
    assert torch.allclose(kd_loss(s, t, y, 1.0, 0.0), torch.nn.functional.kl_div(
        torch.log_softmax(s, 1), torch.softmax(t, 1), reduction="batchmean"))


# -- teacher --------------------------------------------------------------------------------


@pytest.mark.slow
def test_teacher_checkpoint_contents(teacher_ckpt: Path) -> None:
    ck = read_checkpoint(teacher_ckpt)
    assert ck["format"] == "splitbits-ckpt" and ck["kind"] == "teacher"
    assert ck["spec"]["arch"] == "tiny" and ck["spec"]["family"] is None and ck["spec"]["num_classes"] == 12
    assert ck["spec"]["tiny_widths"] == [8, 16, 16] and len(ck["spec"]["class_names"]) == 12
    assert ck["config"]["train"]["epochs"] == 2 and ck["config"]["data"] == validate_config(
        teacher_config())["data"]
    m = ck["metrics"]
    assert m["finished"] and m["kind"] == "teacher" and m["val_images"] == 24 and m["train_images"] == 48
    assert 0.0 <= m["val_top1"] <= 100.0 and m["wall_train_s"] > 0 and m["jpeg75_bytes_per_image"] > 0
    assert ck["train_state"]["finished"]
    model, _ = load_model(teacher_ckpt)
    assert isinstance(model, TeacherClassifier)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 12)


@pytest.mark.slow
def test_teacher_resume_continues_and_matches_an_uninterrupted_run(tmp_path: Path, teacher_ckpt: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "t.pt"
    partial = train_teacher(teacher_config(), out, device="cpu", progress=False, max_epochs=1)
    assert partial["finished"] is False
    ck = read_checkpoint(out)
    assert ck["train_state"]["epoch"] == 1 and not ck["train_state"]["finished"]
    assert "optimizer" in ck["train_state"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="splitbits.trainer"):
        final = train_teacher(teacher_config(), out, device="cpu", progress=False, resume=True)
    assert final["finished"]
    assert _epoch_lines(caplog) == ["teacher epoch 2/2"]  # continued: epoch 1 was not trained again
    a, b = read_checkpoint(out)["model"], read_checkpoint(teacher_ckpt)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    # a finished run resumes to its stored metrics without training
    assert train_teacher(teacher_config(), out, device="cpu", progress=False, resume=True) == final
    with pytest.raises(TrainError, match=r"differs .* in train\.lr"):
        train_teacher(teacher_config(lr=0.01), out, device="cpu", progress=False, resume=True)


def test_teacher_rejects_wrong_num_classes(tmp_path: Path) -> None:
    cfg = teacher_config()
    cfg["model"]["num_classes"] = 10
    with pytest.raises(ConfigError, match="num_classes is 10"):
        train_teacher(cfg, tmp_path / "t.pt", device="cpu", progress=False)


# -- students -------------------------------------------------------------------------------


def _frozen_state(sd: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    prefixes = tuple(f"bottleneck_layer.{m}." for m in FROZEN_IN_STAGE2[family])
    return {k: v for k, v in sd.items() if k.startswith(prefixes)}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mshp", "fp"])
def test_student_two_stages(tmp_path: Path, teacher_ckpt: Path, family: str,
                            caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / f"{family}.pt"
    cfg = student_config(family)
    # stop right after stage 1: the checkpoint is the stage-1 model, ready for stage 2
    partial = train_student(cfg, teacher_ckpt, out, device="cpu", progress=False, max_epochs=1)
    assert partial["finished"] is False and partial["stage"] == "stage2"
    ck1 = read_checkpoint(out)
    assert ck1["train_state"]["stage"] == "stage2" and ck1["train_state"]["epoch"] == 0
    after_stage1 = {k: v.clone() for k, v in ck1["model"].items()}
    teacher_sd = read_checkpoint(teacher_ckpt)["model"]
    assert torch.equal(after_stage1["layer2.conv1.weight"], teacher_sd["net.layer2.conv1.weight"])  # rest frozen

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="splitbits.trainer"):
        metrics = train_student(cfg, teacher_ckpt, out, device="cpu", progress=False, resume=True)
    assert _epoch_lines(caplog) == ["stage2 epoch 1/2", "stage2 epoch 2/2"]  # stage 1 was not trained again
    assert metrics["finished"] and metrics["family"] == family and metrics["beta"] == 0.32
    for key in ("student_val_top1", "teacher_val_top1", "est_bits_per_image", "est_bytes_per_image",
                "wall_stage1_s", "wall_stage2_s", "stage1_val_top1", "jpeg75_bytes_per_image"):
        assert key in metrics, key
    assert metrics["est_bytes_per_image"] > 0
    assert metrics["est_bits_per_image"] == pytest.approx(
        sum(v for k, v in metrics.items() if k.startswith("est_bits_") and k != "est_bits_per_image"))
    if family == "mshp":
        assert metrics["est_bits_z"] > 0

    ck = read_checkpoint(out)
    assert ck["kind"] == "student" and ck["spec"]["family"] == family and ck["spec"]["tiny_widths"] == [8, 16, 16]
    assert ck["config"]["student"]["beta"] == 0.32 and ck["config"]["student"]["teacher"] == str(teacher_ckpt)
    assert ck["metrics"] == metrics and ck["train_state"]["finished"]
    # stage 2 left the encoder and the entropy model untouched, and trained the decoder and the rest
    final = ck["model"]
    frozen = _frozen_state(after_stage1, family)
    assert frozen and all(torch.equal(final[k], v) for k, v in frozen.items())
    dec = "g_s" if family == "mshp" else "decoder"
    assert not torch.equal(final[f"bottleneck_layer.{dec}.0.weight"], after_stage1[f"bottleneck_layer.{dec}.0.weight"])
    assert not torch.equal(final["fc.weight"], after_stage1["fc.weight"])

    model, _ = load_model(out)
    assert isinstance(model, SplitClassifier) and model.family == family
    assert isinstance(model.bottleneck_layer, MSHPBottleneck) == (family == "mshp")
    x = torch.rand(2, 3, 64, 64)
    ref = model.compress_reference(x)  # CDF tables were built by update(force=True)
    logits = model.decompress_reference(ref["strings"], ref["shape"])
    assert torch.allclose(logits, model(x), atol=1e-4)


@pytest.mark.slow
def test_student_errors(tmp_path: Path, teacher_ckpt: Path) -> None:
    cfg = student_config("mshp")
    with pytest.raises(ConfigError, match="needs a teacher checkpoint"):
        train_student(cfg, None, tmp_path / "s.pt", device="cpu", progress=False)
    with pytest.raises(TrainError, match="not found"):
        train_student(cfg, tmp_path / "nope.pt", tmp_path / "s.pt", device="cpu", progress=False)
    with pytest.raises(TrainError, match="not a teacher"):
        bad = tmp_path / "student.pt"
        train_student(cfg, teacher_ckpt, bad, device="cpu", progress=False, max_epochs=1)
        train_student(cfg, bad, tmp_path / "s2.pt", device="cpu", progress=False)
    wrong = student_config("mshp")
    wrong["model"]["arch"] = "resnet50"
    with pytest.raises(TrainError, match="is a tiny"):
        train_student(wrong, teacher_ckpt, tmp_path / "s3.pt", device="cpu", progress=False)
    with pytest.raises(TrainError, match=r"resume: .* holds a teacher"):
        train_student(cfg, teacher_ckpt, teacher_ckpt, device="cpu", progress=False, resume=True)


# -- CLI ------------------------------------------------------------------------------------


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("--teacher", "--set", "--resume", "student.beta=0.32", "tiny_mshp", "torchrun", "0.08"):
        assert word in text


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["train", "tiny_mshp", "--out", str(tmp_path / "s.pt")]) == 2
    assert "needs a teacher checkpoint" in capsys.readouterr().err
    assert cli_main(["train", "tiny_mshp", "--out", str(tmp_path / "s.pt"), "--set", "student.bta=1"]) == 2
    assert "did you mean 'beta'" in capsys.readouterr().err
    assert cli_main(["train", "tiny_teacher"]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli_main(["train", "tiny_teacher", "--out", str(tmp_path / "t.pt"), "--set",
                     "data.dataset=imagefolder:/no/such/dir"]) == 2
    assert "path not found" in capsys.readouterr().err
    assert cli_main(["train", "tiny_mshp", "--out", str(tmp_path / "s.pt"), "--teacher", str(tmp_path / "no.pt")]) == 2
    assert "teacher checkpoint not found" in capsys.readouterr().err
    assert cli_main(["train", "tiny_teacher", "--out", str(tmp_path)]) == 2
    assert "exists and is not a file" in capsys.readouterr().err
    assert cli_main(["train", "tiny_teacher", "--out", str(tmp_path / "t.pt"), "--threads", "0"]) == 2
    assert "--threads: must be at least 1" in capsys.readouterr().err  # validated at parse time
    assert cli_main(["train", "--print-config", "tiny_mshp", "--set", "student.beta=1.28"]) == 0
    assert "beta: 1.28" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_trains_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cfg.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(teacher_config(epochs=1)))
    out, js = tmp_path / "t.pt", tmp_path / "m.json"
    assert cli_main(["train", str(cfg), "--out", str(out), "--json", str(js), "--no-progress",
                     "--device", "cpu", "--set", "train.limit_batches=1"]) == 0
    metrics = json.loads(js.read_text())
    assert metrics["kind"] == "teacher" and metrics["finished"]
    assert "val top-1" in capsys.readouterr().out
    assert read_checkpoint(out)["config"]["train"]["limit_batches"] == 1
