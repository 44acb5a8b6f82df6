"""``splitbits campaign CONFIG --ray [ADDRESS]``: a campaign's units as Ray tasks.

The driver (this process) checks the config, the models and the data, opens the results store and
submits every unit not stored yet as a Ray task (``cpus``/``gpus`` per unit). Ray schedules them on
whichever worker is free (dynamic: a slow node takes fewer units) and retries a task whose worker
died (``max_retries``). Each finished unit's rows come back to the driver, which alone writes
``OUT/results.sqlite`` (one transaction per unit, as a plain run), so the store never leaves the
driver's disk: resume semantics are those of a plain run, a re-run skips stored units. A unit that
still fails after its retries is reported and left unstored (the next run computes it).

A worker builds the campaign's models and images once (:class:`UnitContext`) and reuses them for
every unit it computes. The dataset and the models' paths must be readable on every node (a shared
folder, or the same paths on each); ``builtin`` is generated on each node identically.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from splitbits.attacks.campaign import (
    Campaign,
    CampaignError,
    Unit,
    UnitContext,
    open_store,
    plan_units,
    report_campaign,
)
from splitbits.attacks.runner import machine_info, pick_device
from splitbits.cluster.connect import connect
from splitbits.runtime.progress import Bars
from splitbits.runtime.report import write_json

log = logging.getLogger(__name__)

#: per worker process: the context of the campaign it last computed a unit of
_CONTEXT: dict[str, Any] = {}


def _context(c: Campaign, device: str, threads: int) -> UnitContext:
    import json

    import torch

    key = json.dumps([c.config, device], sort_keys=True, default=str)
    if _CONTEXT.get("key") != key:
        torch.set_num_threads(threads)
        _CONTEXT.clear()
        _CONTEXT.update(key=key, ctx=UnitContext(c, pick_device(device)))
    return _CONTEXT["ctx"]


def _compute_unit(c: Campaign, u: Unit, device: str, threads: int,
                  fault: Callable[[str, int], None] | None) -> tuple[str, list[dict[str, Any]], str]:
    """(unit key, rows, node) of one unit, computed in a Ray worker. ``fault(unit_key, images_done)``
    runs in the worker at the start and after each batch (fault injection in tests)."""
    ctx = _context(c, device, threads)
    ukey, done = ctx.key(u), [0]

    def progress(n: int) -> None:
        done[0] += n
        if fault is not None:
            fault(ukey, done[0])

    progress(0)
    return ukey, ctx.compute(u, None, progress=progress), ray.util.get_node_ip_address()


def _unit_device(device: str, gpus: float) -> str:
    """The torch device of a unit: CUDA only on the GPUs Ray gave it (``gpus`` > 0), else the CPU."""
    if gpus > 0:
        return "cuda"
    if device.startswith("cuda"):
        raise CampaignError(f"device {device!r} on Ray needs GPUs per unit (--gpus-per-unit 1): a unit without them "
                            "would use a GPU Ray has not given it")
    return "cpu"


def run_campaign_ray(c: Campaign, out: str | os.PathLike, *, address: str | None = None, fresh: bool = False,
                     device: str | None = None, cpus: float = 1.0, gpus: float = 0.0, num_cpus: int | None = None,
                     max_retries: int = 3, progress: bool = True,
                     on_unit: Callable[[Unit, int], None] | None = None,
                     fault: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the campaign on Ray into ``out``; the driver writes the store and the report,
    and the counts, the cluster and the machine to ``out/run_ray.json``.

    ``address``: a started cluster (``ray start --head``; "auto" finds it), else Ray in this process
    with ``num_cpus``. ``cpus``/``gpus``: resources per unit (``gpus > 0`` runs units on CUDA).
    ``on_unit(unit, n_stored)`` runs on the driver after each stored unit.
    """
    out = Path(out)
    dev = _unit_device(device or c.config["device"], gpus)
    threads = int(c.config["threads"] or max(1, int(cpus)))
    store = open_store(c, out, 0, fresh)
    started = False
    try:
        ctx = UnitContext(c, pick_device("cpu"))  # every bad input fails here, before Ray starts
        done = store.done_units(d.label for d in c.defences)
        units = plan_units(c)
        todo = [u for u in units if ctx.key(u) not in done]
        mids = [m for _, m in ctx.targets]
        del ctx
        log.info("campaign %s on Ray: %d units, %d already stored, %d to run", c.config["name"], len(units),
                 len(units) - len(todo), len(todo))
        started = connect(address, num_cpus)
        t0 = time.perf_counter()
        computed, failed = _drive(c, store, todo, dev, threads, (cpus, gpus, max_retries), progress, on_unit, fault)
        summary: dict[str, Any] = {
            "units": len(units), "computed": computed, "skipped": len(units) - len(todo), "failed": failed,
            "rows": store.count(), "wall_s": time.perf_counter() - t0,
            "ray": {"address": address or "in-process", "version": ray.__version__,
                    "resources": {k: v for k, v in ray.cluster_resources().items() if "node:" not in k},
                    "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
                    "per_unit": {"cpus": cpus, "gpus": gpus}, "max_retries": max_retries}}
        files = report_campaign(c, out, store, mids)
        summary["report"] = {k: str(v) for k, v in files.items()}
    finally:
        store.close()
        if started:
            ray.shutdown()
    summary["machine"] = machine_info()
    write_json(out / "run_ray.json", summary)
    if failed:
        raise CampaignError(f"{len(failed)} unit(s) failed after {max_retries} retries (the others are stored; "
                            f"rerun to compute them): {failed[0]['unit']}: {failed[0]['error']}")
    return summary


def _drive(c: Campaign, store: Any, todo: list[Unit], device: str, threads: int, resources: tuple[float, float, int],
           progress: bool, on_unit: Callable[[Unit, int], None] | None,
           fault: Callable[[str, int], None] | None) -> tuple[int, list[dict[str, str]]]:
    """Keep the cluster busy with ``todo`` (at most twice as many tasks in flight as units fit, so a
    huge grid neither floods Ray nor waits on a huge list) and store each unit's rows as they come
    back; (stored, failures)."""
    cpus, gpus, retries = resources
    task = ray.remote(_compute_unit).options(num_cpus=cpus, num_gpus=gpus, max_retries=retries,
                                             retry_exceptions=False)
    fit = ray.cluster_resources().get("CPU", 1.0) / cpus
    if gpus > 0:
        fit = min(fit, ray.cluster_resources().get("GPU", 0.0) / gpus)
    window = max(2, int(2 * fit))
    c_ref = ray.put(c)
    queue, pending = list(reversed(todo)), {}
    computed, failed = 0, []
    try:
        with Bars(progress, unit="units") as bars:
            bar = bars.add(f"campaign {c.config['name']} (Ray)", len(todo))
            while queue or pending:
                while queue and len(pending) < window:
                    u = queue.pop()
                    pending[task.remote(c_ref, u, device, threads, fault)] = u
                ready, _ = ray.wait(list(pending), num_returns=1)
                u = pending.pop(ready[0])
                try:
                    ukey, rows, node = ray.get(ready[0])
                except ray.exceptions.RayError as exc:  # a failure in the unit, or its worker died too often
                    lines = [ln for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
                    failed.append({"unit": f"{u.point.key()}|chunk{u.chunk}", "error": lines[-1].strip()})
                    bars.advance(bar, info=f"{len(failed)} failed")
                    continue
                if rows:
                    store.write_unit(rows)
                    computed += 1
                    log.debug("stored %s (computed on %s)", ukey, node)
                    if on_unit is not None:
                        on_unit(u, computed)
                bars.advance(bar)
    except BaseException:  # ^C or a store error: what is stored stays, nothing else keeps running
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return computed, failed
