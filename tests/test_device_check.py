"""``splitbits device check``: the dry run (every step at tiny sizes on the CPU, what CI runs), the
budget and --skip, a failing step, the device rules, and the carried-wheel script's refusals."""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from splitbits.attacks import device_check as dc  # noqa: E402
from splitbits.runtime.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALL_BUT_ENVIRONMENT = tuple(s for s in dc.STEPS if s != "environment")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The CLI's dry run in a fresh process (it sets torch/BLAS threads and seeds): rc, stdout, JSON."""
    path = tmp_path_factory.mktemp("device") / "check.json"
    res = subprocess.run([sys.executable, "-c", "import sys; from splitbits.runtime.cli import main; "
                          "sys.exit(main(sys.argv[1:]))", "device", "check", "--dry-run", "--json", str(path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    return res, json.loads(path.read_text()) if path.is_file() else None


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_json(dry_run):
    res, out = dry_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert out is not None and out["schema"] == dc.SCHEMA and out["dry_run"] is True and out["device"] == "cpu"
    dt.datetime.fromisoformat(out["created"])
    assert out["machine"]["cpu_count"] >= 1 and out["wall_s"] > 0
    assert list(out["steps"]) == list(dc.STEPS)
    assert all(s["status"] == "ok" and s["seconds"] > 0 for s in out["steps"].values()), \
        {k: s.get("error") for k, s in out["steps"].items()}
    assert out["complete"] is True and out["checks_judged"] is False
    assert out["path_in_repo"].startswith("runs/device/") and out["path_in_repo"].endswith("-dry-run.json")
    assert "wrote" in res.stdout


@pytest.mark.slow
def test_dry_run_training_steps_ran_with_finite_losses(dry_run):
    steps = dry_run[1]["steps"]
    tiny = steps["tiny_student"]
    for stage, epochs in (("teacher", 1), ("stage1", 2), ("stage2", 2)):
        fig = tiny[stage]
        assert fig["epochs"] == epochs and fig["steps"] == 2 * epochs, stage
        assert fig["losses_finite"] and all(math.isfinite(v) for v in fig["loss_per_epoch"]), stage
        assert fig["samples_per_s"] > 0, stage
    r50 = steps["resnet50_student"]
    assert r50["steps"] == dc.DRY.r50_steps and r50["timed_steps"] == dc.DRY.r50_steps - dc.DRY.r50_warmup
    assert r50["losses_finite"] and math.isfinite(r50["loss_first"]) and r50["samples_per_s"] > 0
    assert r50["input"] == [3, dc.DRY.r50_size, dc.DRY.r50_size]


@pytest.mark.slow
def test_dry_run_attack_and_coder_steps_report_their_figures(dry_run):
    out = dry_run[1]
    steps = out["steps"]
    bench = steps["bench_attack"]
    assert {"batched", "per_image", "per_image_sequential_eot"} <= set(bench) and bench["speedup_vs_per_image"] > 0
    pgd = steps["pgd_e_resnet50"]
    assert pgd["images"] == dc.DRY.pgd_images and pgd["images_per_s"] > 0 and pgd["rate_clean_bits"] > 0
    coder = steps["numba_coder"]
    assert set(coder["summary"]) == {"resnet50_mshp_224", "resnet50_fp_224"}
    assert all(s["lossless"] and s["numba_encode_msym_s"] > 0 for s in coder["summary"].values())
    assert set(out["checks"]) == {"tiny_student: losses finite", "tiny_student: stage-1 loss fell",
                                  "tiny_student: stage-2 loss fell", "resnet50_student: losses finite",
                                  "resnet50_student: loss fell", "bench_attack: batched >= 5x per-image",
                                  "pgd_e_resnet50: rate rose", "numba_coder: lossless"}


def test_a_step_that_would_not_fit_the_budget_is_skipped_and_says_so(tmp_path):
    sizes = replace(dc.DRY, estimates={**dict.fromkeys(dc.STEPS, 1000.0), "environment": 0.0})
    out, path = dc.run_check(dc.CheckOptions(dry_run=True, budget_s=60, sizes=sizes), tmp_path / "c.json",
                             say=lambda line: None)
    assert out["steps"]["environment"]["status"] == "ok"
    for name in ALL_BUT_ENVIRONMENT:
        step = out["steps"][name]
        assert step["status"] == "skipped" and step["reason"].startswith("would not fit: expected ~1000 s"), name
    assert out["complete"] is False and out["checks"] == {}
    assert json.loads(path.read_text())["steps"] == out["steps"]


def test_skipped_steps_say_skip_and_unknown_steps_are_refused(tmp_path):
    out, _ = dc.run_check(dc.CheckOptions(dry_run=True, skip=ALL_BUT_ENVIRONMENT), tmp_path / "c.json",
                          say=lambda line: None)
    assert [s["status"] for s in out["steps"].values()] == ["ok"] + ["skipped"] * len(ALL_BUT_ENVIRONMENT)
    assert out["steps"]["numba_coder"]["reason"] == "--skip"
    with pytest.raises(dc.DeviceCheckError, match="no such step"):
        dc.run_check(dc.CheckOptions(dry_run=True, skip=("tiny",)), tmp_path / "d.json")
    assert not (tmp_path / "d.json").exists()


def test_a_failing_step_is_recorded_the_others_run_and_the_command_exits_1(tmp_path, monkeypatch, capsys):
    def boom(run: dc.StepRun) -> dict:
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setitem(dc.STEPS, "resnet50_student", boom)
    path = tmp_path / "c.json"
    skip = ",".join(s for s in ALL_BUT_ENVIRONMENT if s != "resnet50_student")
    rc = main(["device", "check", "--dry-run", "--json", str(path), "--skip", skip])
    assert rc == 1
    steps = json.loads(path.read_text())["steps"]
    assert steps["environment"]["status"] == "ok"
    assert steps["resnet50_student"]["status"] == "failed"
    assert steps["resnet50_student"]["error"] == "RuntimeError: CUDA error: out of memory"
    assert "resnet50_student failed" in capsys.readouterr().out


def test_an_unknown_step_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["device", "check", "--dry-run", "--skip", "nope", "--json", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("splitbits device check: error: --skip nope: no such step")


def test_a_full_run_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(dc.DeviceCheckError, match="the full check needs one"):
        dc.resolve_device("auto", dry_run=False)
    with pytest.raises(dc.DeviceCheckError, match="need a GPU"):
        dc.resolve_device("cpu", dry_run=False)
    assert dc.resolve_device("auto", dry_run=True) == torch.device("cpu")


def test_the_default_json_path_names_date_and_gpu_or_host():
    when = dt.datetime(2026, 12, 1, 9, 30, tzinfo=dt.timezone.utc)
    assert dc.default_json_path({"gpu": "NVIDIA H200", "hostname": "h"}, False, when) == \
        Path("docs/device/2026-12-01-nvidia-h200.json")
    assert dc.default_json_path({"hostname": "ci_box.local"}, True, when) == \
        Path("runs/device/2026-12-01-ci-box-local-dry-run.json")


def test_checks_judge_the_figures_of_the_steps_that_ran():
    steps = {"resnet50_student": {"status": "ok", "losses_finite": True, "loss_fell": False},
             "bench_attack": {"status": "ok", "target_5x_met": True},
             "pgd_e_resnet50": {"status": "failed", "error": "x"}}
    assert dc.checks(steps) == {"resnet50_student: losses finite": True, "resnet50_student: loss fell": False,
                                "bench_attack: batched >= 5x per-image": True}


def test_device_check_sh_refuses_a_missing_wheel_folder(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "jetson" / "device_check.sh"), str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=60,
                         env={"OUT": str(tmp_path / "out"), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2
    assert "no wheels in" in res.stderr and "jetson/device_wheels.sh" in res.stderr


def test_the_device_scripts_parse():
    for name in ("device_check.sh", "device_wheels.sh"):
        res = subprocess.run(["bash", "-n", str(ROOT / "jetson" / name)], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
