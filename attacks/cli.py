"""``splitbits attack`` (one point) and ``splitbits campaign`` (a grid). Standard library only at import."""

from __future__ import annotations

import argparse

from splitbits.runtime.cli import (
    CliError,
    Command,
    float_range,
    int_range,
    missing_extra,
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
    try:
        from splitbits.attacks.commands import attack_command
    except ImportError as exc:
        raise missing_extra(exc, "attacks") from exc
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
    try:
        from splitbits.attacks.commands import campaign_command
    except ImportError as exc:
        raise missing_extra(exc, "attacks") from exc
    return campaign_command(args)


COMMANDS = {
    "attack": Command("attack/corrupt one point and measure real packet bytes, accuracy and latency",
                      _attack_args, _attack_run, description=ATTACK_DESCRIPTION),
    "campaign": Command("run a resumable, shardable attack/corruption/defence grid from a YAML config",
                        _campaign_args, _campaign_run, description=CAMPAIGN_DESCRIPTION),
}

__all__ = ["COMMANDS", "CliError"]
