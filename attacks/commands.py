"""``splitbits attack`` (one point) and ``splitbits campaign`` (a grid). Standard library only at import."""

from __future__ import annotations

import argparse
from pathlib import Path

from splitbits.runtime.cli import (
    CliError,
    Command,
    float_range,
    int_range,
    needs_extra,
    output_file,
    positive_float,
    positive_int,
)

ATTACK_DESCRIPTION = """\
Attack (or corrupt) a split model's inputs and measure the REAL packet bytes from the runtime.

TARGET is a bundle directory (its manifest names the source checkpoint; or pass --checkpoint) or a
checkpoint (exported once to a cached bundle; or pass --bundle). The torch model supplies gradients;
bytes are len(packet) from the ONNX Runtime edge encoder and top-1 comes from the server decoder, for
the clean images and the attacked ones, each with every --defence. The surrogate (−Σlog₂p/8) is shown
beside the real bytes, and the attack is checked: its objective must rise.

Threats: clean, pgd-e (rate), pgd-acc (cross-entropy), noise (±ε sign noise), pgd-e-lowfreq,
pgd-e-region, pgd-e-bpda (through --through); corruptions: --attack corruption --corruption NAME
--severity S (or --attack NAME). ε is in units of 1/255 unless --eps-unit unit ("8/255" also works).

examples:
  splitbits attack runs/demo/bundle_mshp --attack pgd-e --eps 8 --defence oatv --json pgd8.json
  splitbits attack runs/demo/student_mshp.pt --attack noise --eps 8 --limit 128
  splitbits attack runs/demo/bundle_mshp --attack corruption --corruption shot_noise --severity 3
  splitbits attack runs/demo/bundle_mshp --attack pgd-e-bpda --eps 8 --through oatv --defence oatv
  splitbits attack runs/demo/bundle_mshp --attack pgd-e --eps 8 --save-inputs adv.npz   # for the device bench
"""

CAMPAIGN_DESCRIPTION = """\
Run a grid of models × threats × ε (and corruptions × severities) × defences from a YAML config,
storing results row by row in OUT/results.sqlite: an interrupted campaign loses at most the unit in
flight, and rerunning the same command resumes without redoing stored rows. Shard across processes
or GPUs with torchrun (each rank takes every WORLD_SIZE-th unit):

  torchrun --nproc_per_node 4 --no-python splitbits campaign CONFIG.yaml
  splitbits campaign CONFIG.yaml --shard 1/4      # by hand, one process per shard

Writes OUT/report.md, report.html, report.json and PNG plots (bytes vs ε, accuracy vs ε, bytes per
corruption and severity). See attacks/campaigns/example.yaml for every key.
"""


def _attack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="bundle directory or checkpoint (.pt)")
    g = p.add_argument_group("threat")
    g.add_argument("--attack", default="pgd-e", help="threat name, 'corruption', or a corruption name")
    g.add_argument("--eps", default="8", help="L∞ budget in units of 1/255 (or k/255, or see --eps-unit)")
    g.add_argument("--eps-unit", choices=("255", "unit"), default="255", help="unit of --eps numbers")
    g.add_argument("--steps", type=positive_int, default=20, help="PGD steps")
    g.add_argument("--step-size", type=positive_float, default=None,
                   help="PGD step (fraction of [0,1]); default 2.5·ε/steps")
    g.add_argument("--eot", type=positive_int, default=16, help="EOT samples of the quantisation noise per step")
    g.add_argument("--no-random-start", action="store_true", help="start PGD at the clean image")
    g.add_argument("--terms", default="y,z", help="rate terms the entropy attacks maximise: y, z or y,z")
    g.add_argument("--quant", choices=("noise", "ste"), default="noise",
                   help="gradient through quantisation: uniform noise (EOT) or straight-through rounding")
    g.add_argument("--band", type=float_range(0, 1, lo_open=True), default=0.25,
                   help="pgd-e-lowfreq: fraction of the DCT band kept")
    g.add_argument("--through", default="oatv", help="pgd-e-bpda/-region: the defence attacked (oatv, tv, jpeg)")
    g.add_argument("--through-grad", choices=("bpda", "unroll"), default="bpda",
                   help="pgd-e-bpda: identity backward (BPDA) or autograd through every defence iteration")
    g.add_argument("--corruption", default=None, help="corruption name (with --attack corruption)")
    g.add_argument("--severity", type=int_range(1, 5), default=3, help="corruption severity 1..5")
    d = p.add_argument_group("defence")
    d.add_argument("--defence", action="append", default=[], metavar="SPEC",
                   help="measure also with this defence (repeatable): oatv, tv, jpeg, "
                        "e.g. oatv:iterations=100,lam=0.1,alpha=0.15 or jpeg:quality=50")
    s = p.add_argument_group("data and run")
    s.add_argument("--dataset", default="builtin", help="builtin, imagefolder:PATH or imagenet-c:PATH?...")
    s.add_argument("--split", default="val")
    s.add_argument("--limit", type=positive_int, default=64, help="first N images of the split")
    s.add_argument("--image-size", type=int_range(16, 8192), default=None, help="default: the model's input size")
    s.add_argument("--batch", type=positive_int, default=32, help="images per attack batch (EOT multiplies it)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torch side; bytes always on ORT)")
    s.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--checkpoint", default=None, help="checkpoint of a bundle whose manifest has no source")
    s.add_argument("--bundle", default=None, help="bundle of a checkpoint TARGET (default: cached export)")
    s.add_argument("--json", type=output_file, default=None, metavar="FILE", help="write the full result as JSON")
    s.add_argument("--save-inputs", type=output_file, default=None, metavar="FILE.npz",
                   help="write the attacked uint8 NHWC images and labels (for the on-device bench)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _attack_run(args: argparse.Namespace) -> int:
    with needs_extra("attacks"):
        from splitbits.attacks.actions import attack_command
    return attack_command(args)


def _campaign_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="campaign YAML (see attacks/campaigns/example.yaml)")
    p.add_argument("--out", default=None, help="output folder (default: the config's out, else runs/campaigns/NAME)")
    p.add_argument("--fresh", action="store_true", help="discard stored results and start over")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from stored rows")
    p.add_argument("--dry-run", action="store_true", help="validate the config and list the units; run nothing")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run shard I of N (default: torchrun's RANK/WORLD_SIZE)")
    p.add_argument("--device", default=None, help="override the config's device")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _campaign_run(args: argparse.Namespace) -> int:
    with needs_extra("attacks"):
        from splitbits.attacks.actions import campaign_command
    return campaign_command(args)



BENCH_ATTACK_DESCRIPTION = """\
``splitbits bench attack``: batched PGD-E vs per-image loops with the same settings, in one run.

Three implementations of the same attack (``--steps`` PGD steps, ``--eot`` noise samples per step):

* ``batched``: ``--batch`` images at once, the EOT samples of all of them in one forward/backward
  (what ``splitbits attack`` and campaigns use);
* ``per_image``: one image at a time, its EOT samples still batched;
* ``per_image_sequential_eot``: one image at a time and one EOT sample per forward/backward,
  gradients accumulated (the straightforward reference-style loop).

Images/s of each and the speedups of ``batched`` over the two loops go to stdout and ``--json``,
together with the machine's load average and thread count (timings on a shared CPU vary).
"""


def add_bench_attack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="student checkpoint (default: an untrained tiny MSHP model; speed does not depend on weights)")
    p.add_argument("--images", type=positive_int, default=64, help="images attacked by the batched implementation")
    p.add_argument("--loop-images", type=positive_int, default=8, help="images attacked by each per-image loop")
    p.add_argument("--batch", type=positive_int, default=32, help="batch of the batched implementation")
    p.add_argument("--steps", type=positive_int, default=20, help="PGD steps")
    p.add_argument("--eot", type=positive_int, default=16, help="EOT samples per step")
    p.add_argument("--eps", type=float_range(0, 255), default=8.0, help="ε in units of 1/255")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--skip-sequential", action="store_true", help="skip the sequential-EOT loop (slow)")
    p.add_argument("--json", type=output_file, default=None, metavar="FILE", help="write the results as JSON")


def run_bench_attack(args: argparse.Namespace) -> int:
    from splitbits.attacks.bench import main

    return int(main(args) or 0)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (checkpoints are cached here)")
    p.add_argument("--family", choices=["mshp", "fp"], default="mshp", help="entropy model of the student")
    p.add_argument("--fresh", action="store_true", help="retrain even if cached checkpoints match the config")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate on the first N validation images only")
    p.add_argument("--no-attacks", action="store_true", help="skip the attack/defence/corruption section")
    p.add_argument("--hyper", choices=["auto", "int", "float"], default="auto",
                   help="MSHP hyper path of the edge encoder: int (deterministic across devices; auto picks it) "
                        "or float (hyper.onnx)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--teacher-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the tiny_teacher config (repeatable), e.g. train.epochs=5")
    p.add_argument("--student-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the tiny_<family> student config, e.g. student.beta=0.32")


def run_demo(args: argparse.Namespace) -> int:
    with needs_extra("attacks"):
        from splitbits.attacks.demo import run_demo as demo
    r = demo(args.out, family=args.family, fresh=args.fresh, limit=args.limit, attacks=not args.no_attacks,
             progress=not args.no_progress, teacher_overrides=tuple(args.teacher_set),
             student_overrides=tuple(args.student_set), hyper=args.hyper)
    print(f"report: {Path(args.out) / 'report.md'}  (and report.json, bytes.png, latency.png, accuracy.png)")
    return 0 if r else 1

COMMANDS = {
    "demo": Command(
        "train, export, run and report on the builtin dataset (what `make demo` runs)",
        add_demo_arguments, run_demo,
        description="The whole pipeline on the builtin dataset: train the tiny teacher and split student "
        "(reusing cached checkpoints whose config is unchanged), export a verified bundle, push every "
        "validation image through edge encode -> packet -> server decode on ONNX Runtime, and write "
        "report.json, report.md and plots (accuracy, bytes per image real vs estimated vs JPEG q75, "
        "latency per stage).",
    ),
    "attack": Command("attack/corrupt one point and measure real packet bytes, accuracy and latency",
                      _attack_args, _attack_run, description=ATTACK_DESCRIPTION),
    "campaign": Command("run a resumable, shardable attack/corruption/defence grid from a YAML config",
                        _campaign_args, _campaign_run, description=CAMPAIGN_DESCRIPTION),
    "bench.attack": Command(
        "batched vs per-image attack throughput (images/s)",
        add_bench_attack_arguments, run_bench_attack, description=BENCH_ATTACK_DESCRIPTION,
    ),
}

__all__ = ["COMMANDS", "CliError"]
