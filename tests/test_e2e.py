"""End to end on a tiny model: train (a few steps) → export → edge/packet/server → report."""

from __future__ import annotations

import json

import pytest

QUICK_TEACHER = ("train.epochs=1", "train.limit_batches=3", "data.train_limit=384", "data.val_limit=64",
                 "data.jpeg_reference_images=0")
QUICK_STUDENT = ("stage1.epochs=1", "stage1.limit_batches=3", "stage2.epochs=1", "stage2.limit_batches=3",
                 "data.train_limit=384", "data.val_limit=64", "data.jpeg_reference_images=0")


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    from splitbits.attacks.demo import run_demo

    out = tmp_path / "demo"
    r = run_demo(out, family="mshp", limit=24, attacks=False, progress=False,
                 teacher_overrides=QUICK_TEACHER, student_overrides=QUICK_STUDENT)
    for name in ("report.json", "report.md", "bytes.png", "latency.png", "accuracy.png", "teacher.pt",
                 "student_mshp.pt", "bundle_mshp/manifest.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "report.json").read_text())
    assert saved["dataset"]["images"] == 24
    b = saved["bytes"]
    # real sizes are packets; the estimate sits beside them; compressai equivalence holds per image
    assert b["real_packet"]["mean"] > b["payload"]["mean"] > 0
    assert b["payload_vs_compressai"]["within_1pct_16B"] is True
    assert saved["top1_agree_with_compressai_path"] == "24/24"
    assert saved["hyper"] == "int"  # the deterministic path is the default
    assert set(saved["latency_ms"]["edge"]) >= {"head", "quantize", "hyper", "encode"}
    assert set(saved["latency_ms"]["server"]) >= {"parse", "decode", "hyper", "tail"}
    assert saved["export_verification"]["ok"] is True
    assert "| real packet" in (out / "report.md").read_text()

    # a second run reuses both checkpoints (same config) instead of retraining; here on the float hyper path
    r2 = run_demo(out, family="mshp", limit=8, attacks=False, progress=False,
                  teacher_overrides=QUICK_TEACHER, student_overrides=QUICK_STUDENT, hyper="float")
    assert "teacher_train_s" not in r2["training"] and "student_train_s" not in r2["training"]
    assert r2["hyper"] == "float" and r2["top1_agree_with_compressai_path"] == "8/8"
    assert "hyper path `float`" in (out / "report.md").read_text()
    assert r["bundle_fingerprint"] == r2["bundle_fingerprint"]
