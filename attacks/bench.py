"""``splitbits bench attack``: batched PGD-E vs per-image loops with the same settings, in one run.

Three implementations of the same attack (``--steps`` PGD steps, ``--eot`` noise samples per step):

* ``batched``: ``--batch`` images at once, the EOT samples of all of them in one forward/backward
  (what ``splitbits attack`` and campaigns use);
* ``per_image``: one image at a time, its EOT samples still batched;
* ``per_image_sequential_eot``: one image at a time and one EOT sample per forward/backward,
  gradients accumulated (the straightforward reference-style loop).

Images/s of each and the speedups of ``batched`` over the two loops go to stdout and ``--json``,
together with the machine's load average and thread count (timings on a shared CPU vary).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def sequential_eot_pgd(model: Any, x: Any, cfg: Any, generator: Any) -> Any:
    """PGD-E on one image with one noise sample per forward/backward (gradients summed over EOT)."""
    import torch

    from splitbits.attacks.model_ops import split_forward
    from splitbits.attacks.threats import project

    noise = torch.rand(x.shape, generator=generator, device=generator.device).to(x)
    x_adv = project(x + (noise * 2 - 1) * cfg.eps, x, cfg.eps)
    for _ in range(cfg.steps):
        x_adv.requires_grad_(True)
        g = torch.zeros_like(x)
        for _ in range(cfg.eot):
            f = split_forward(model, x_adv, "noise").rate(cfg.terms).sum() / cfg.eot
            (gi,) = torch.autograd.grad(f, x_adv)
            g += gi
        x_adv = project(x_adv.detach() + cfg.alpha * g.sign(), x, cfg.eps)
    return x_adv.detach()


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from splitbits.attacks.actions import machine_info
    from splitbits.attacks.model_ops import split_forward
    from splitbits.attacks.runner import pick_device
    from splitbits.attacks.threats import AttackConfig, run_attack

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    if args.checkpoint:
        from splitbits.trainer.checkpoint import load_model

        model, _ = load_model(args.checkpoint)
        source = args.checkpoint
    else:
        from splitbits.trainer.models import ModelSpec, build_model

        torch.manual_seed(0)
        model = build_model(ModelSpec(arch="tiny", family="mshp", num_classes=12, input_size=64))
        source = "untrained tiny MSHP"
    model = model.to(dev).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    size = model.spec.input_size
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand(max(args.images, args.loop_images), 3, size, size, generator=gen, device=dev)
    cfg = AttackConfig(name="pgd-e", eps=args.eps / 255, steps=args.steps, eot=args.eot)

    def rate(xx: Any) -> float:
        with torch.no_grad():
            return float(split_forward(model, xx, "round").rate().mean())

    run_attack(model, x[:2], AttackConfig(name="pgd-e", eps=cfg.eps, steps=2, eot=2), generator=gen)  # warm-up
    out: dict[str, Any] = {"settings": {"steps": args.steps, "eot": args.eot, "eps": f"{args.eps:g}/255",
                                        "batch": args.batch, "images": args.images, "loop_images": args.loop_images,
                                        "input": [3, size, size], "model": source, "device": str(dev)}}
    _sync(dev)
    t = time.perf_counter()
    adv = torch.cat([run_attack(model, x[i:i + args.batch], cfg, generator=gen).x_adv
                     for i in range(0, args.images, args.batch)])
    _sync(dev)
    s = time.perf_counter() - t
    out["batched"] = {"images": args.images, "seconds": s, "images_per_s": args.images / s,
                      "rate_clean_bits": rate(x[:args.images]), "rate_attacked_bits": rate(adv)}
    t = time.perf_counter()
    adv = torch.cat([run_attack(model, x[i:i + 1], cfg, generator=gen).x_adv for i in range(args.loop_images)])
    _sync(dev)
    s = time.perf_counter() - t
    out["per_image"] = {"images": args.loop_images, "seconds": s, "images_per_s": args.loop_images / s,
                        "rate_clean_bits": rate(x[:args.loop_images]), "rate_attacked_bits": rate(adv)}
    if not args.skip_sequential:
        t = time.perf_counter()
        adv = torch.cat([sequential_eot_pgd(model, x[i:i + 1], cfg, gen) for i in range(args.loop_images)])
        _sync(dev)
        s = time.perf_counter() - t
        out["per_image_sequential_eot"] = {"images": args.loop_images, "seconds": s,
                                           "images_per_s": args.loop_images / s,
                                           "rate_clean_bits": rate(x[:args.loop_images]),
                                           "rate_attacked_bits": rate(adv)}
    b = out["batched"]["images_per_s"]
    out["speedup_vs_per_image"] = b / out["per_image"]["images_per_s"]
    if "per_image_sequential_eot" in out:
        out["speedup_vs_per_image_sequential_eot"] = b / out["per_image_sequential_eot"]["images_per_s"]
    out["machine"] = machine_info()
    out["note"] = "all implementations attack the same random images; rates are −Σlog₂p in bits (rounded)"
    return out


def main(args: argparse.Namespace) -> int:
    from splitbits.runtime.cli import CliError
    from splitbits.runtime.report import rich_table, write_json

    for k in ("images", "loop_images", "batch", "steps", "eot", "threads"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise CliError(f"--{k.replace('_', '-')} must be >= 1")
    if not 0 <= args.eps <= 255:
        raise CliError(f"--eps {args.eps} is outside [0, 255] (units of 1/255)")
    from splitbits.attacks.actions import check_device

    check_device(args.device)
    res = run_bench(args)
    rows = [(k, res[k]["images"], res[k]["seconds"], res[k]["images_per_s"], res[k]["rate_attacked_bits"])
            for k in ("batched", "per_image", "per_image_sequential_eot") if k in res]
    rich_table(f"PGD-E throughput ({res['settings']['steps']} steps, EOT {res['settings']['eot']}, "
               f"{res['settings']['device']}, load {res['machine']['loadavg_1_5_15']})",
               ["implementation", "images", "s", "images/s", "attacked bits"], rows)
    line = f"speedup batched vs per-image: {res['speedup_vs_per_image']:.1f}×"
    if "speedup_vs_per_image_sequential_eot" in res:
        line += f"; vs per-image sequential EOT: {res['speedup_vs_per_image_sequential_eot']:.1f}×"
    print(line)
    if args.json:
        write_json(args.json, res)
    else:
        json.dump(res, sys.stdout, indent=1)
        print()
    return 0
