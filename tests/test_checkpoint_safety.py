"""Malicious and malformed checkpoints against every command that loads one: no code runs, and each
is a one-line error (exit 2, no traceback). The corpus is tests/checkpoint_corpus.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from checkpoint_corpus import TINY_STUDENT, build_corpus, live_payloads  # noqa: E402

from splitbits.runtime.cli import main  # noqa: E402
from splitbits.trainer.checkpoint import (  # noqa: E402
    CheckpointError,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from splitbits.trainer.models import build_model  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_corpus")
    marker = root / "PWNED"
    return build_corpus(root / "cases", marker), marker


def test_the_payloads_are_live(corpus):
    """Unrestricted unpickling runs every payload: the corpus is not a set of duds."""
    cases, marker = corpus
    live = live_payloads(cases, marker)
    assert live and all(live.values()), live
    assert not marker.exists()


SC2BENCH_SPEC = ["--arch", "tiny", "--family", "mshp", "--num-classes", "12", "--input-size", "64"]
SC2BENCH_KEYS = ", arch: tiny, family: mshp, num_classes: 12, input_size: 64"

# (name, argv builder): every command that reads a checkpoint given by the user
ENTRY_POINTS = {
    "export": lambda p, tmp: ["export", str(p), "--out", str(tmp / "bundle")],
    "export-sc2bench": lambda p, tmp: ["export", str(p), "--arch", "tiny", "--family", "mshp", "--num-classes",
                                       "12", "--input-size", "64", "--out", str(tmp / "bundle")],
    "attack": lambda p, tmp: ["attack", str(p), "--attack", "noise", "--limit", "2", "--no-progress"],
    "attack-sc2bench": lambda p, tmp: ["attack", str(p), *SC2BENCH_SPEC, "--attack", "noise", "--limit", "2",
                                       "--no-progress"],
    "bench-attack-sc2bench": lambda p, tmp: ["bench", "attack", "--checkpoint", str(p), *SC2BENCH_SPEC, "--images",
                                             "2", "--loop-images", "1", "--steps", "1", "--eot", "1",
                                             "--skip-sequential"],
    "campaign-sc2bench": lambda p, tmp: ["campaign", str(_campaign_yaml(p, tmp, SC2BENCH_KEYS)), "--no-progress"],
    "bench-attack": lambda p, tmp: ["bench", "attack", "--checkpoint", str(p), "--images", "2", "--loop-images", "1",
                                    "--steps", "1", "--eot", "1", "--skip-sequential"],
    "train-teacher": lambda p, tmp: ["train", "tiny_mshp", "--teacher", str(p), "--out", str(tmp / "s.pt"),
                                     "--no-progress"],
    "train-resume": lambda p, tmp: ["train", "tiny_teacher", "--out", str(p), "--resume", "--no-progress"],
    "campaign": lambda p, tmp: ["campaign", str(_campaign_yaml(p, tmp)), "--no-progress"],
}


def _campaign_yaml(ckpt: Path, tmp: Path, spec: str = "") -> Path:
    cfg = tmp / "campaign.yaml"
    cfg.write_text(f"name: hostile\nout: {tmp / 'out'}\nmodels:\n  - {{checkpoint: {ckpt}{spec}}}\n"
                   "dataset: builtin\nlimit: 2\nthreats:\n  - {name: noise, eps: [8]}\n")
    return cfg


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_no_entry_point_runs_code_or_crashes(entry, corpus, tmp_path, capsys):
    cases, marker = corpus
    outcomes = {}
    for name, path in cases.items():
        if entry == "train-resume":
            if name == "file-missing":  # --resume of a run that has not started yet: starts it (not an error)
                continue
            if path.is_file():  # --resume may overwrite --out: work on a copy
                path = Path(shutil.copy(path, tmp_path / path.name))
        rc = main(ENTRY_POINTS[entry](path, tmp_path))
        err = capsys.readouterr().err
        outcomes[name] = (rc, err)
        assert not marker.exists(), f"{entry} ran the payload of {name}"
    for name, (rc, err) in outcomes.items():
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("INFO", "WARNING"))]
        assert rc == 2 and "Traceback" not in err, f"{entry} on {name}: rc={rc}\n{err}"
        assert len(lines) == 1 and lines[0].startswith("splitbits "), f"{entry} on {name}:\n{err}"


def test_payload_errors_name_the_blocked_global(corpus):
    cases, _ = corpus
    with pytest.raises(CheckpointError, match=r"refused.*posix\.system"):
        read_checkpoint(cases["payload-os_system"])
    with pytest.raises(CheckpointError, match=r"refused.*'exec'"):
        read_checkpoint(cases["payload-builtins_exec"])


def test_flipped_tensor_byte_is_refused(corpus):
    cases, _ = corpus
    with pytest.raises(CheckpointError, match="digest"):
        read_checkpoint(cases["tamper-flipped-tensor-byte"])


def test_own_checkpoints_round_trip_with_a_digest(tmp_path):
    torch.manual_seed(1)
    model = build_model(TINY_STUDENT)
    path = save_checkpoint(tmp_path / "ck.pt", model, TINY_STUDENT, kind="student", metrics={"a": 1.5},
                           train_state={"rng": {"python": (3, (1, 2, 3), None)}, "step": 4})
    ck = read_checkpoint(path)
    assert len(ck["digest"]) == 64 and ck["version"] == 2
    loaded, _ = load_model(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_torchdistill_checkpoints_with_args_still_load(tmp_path):
    """sc2bench/torchdistill save argparse args and numpy scalars beside the weights: plain data, allowed."""
    import argparse

    import numpy as np

    torch.manual_seed(2)
    model = build_model(TINY_STUDENT)
    path = tmp_path / "td.pt"
    torch.save({"model": model.state_dict(), "optimizer": {}, "best_value": np.float64(0.75),
                "lr_scheduler": None, "config": {"a": [1, 2]}, "args": argparse.Namespace(epochs=3)}, path)
    loaded, info = load_model(path, TINY_STUDENT)
    assert info["format"] == "sc2bench"
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
