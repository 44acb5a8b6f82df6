"""Campaigns: a grid of models × threats × ε (or corruption × severity) × defences, stored row by row.

A campaign config is YAML (see ``attacks/campaigns/example.yaml``), checked strictly before any
work: unknown keys (with a suggestion), unknown threat/corruption/defence names, ε outside [0, 1],
severities outside 1–5, missing models and empty datasets are all errors up front.

Work is split into *units* — one (model, threat, level, chunk of ``chunk`` images) — and each unit
writes one row per defence into ``OUT/results.sqlite`` in a single transaction. An interrupted
campaign therefore loses at most the unit in flight; rerunning the same command resumes and never
recomputes a stored unit. One machine: ``--shard I/N`` runs every N-th unit in this process, all
shards writing the same SQLite file (WAL mode, which needs one host: a store already written by a
shard on another host is refused), each its counts and machine to ``OUT/run_rankR.json``; the last
shard to finish writes the report. Past one machine, ``--ray`` (``splitbits.cluster.campaign``)
schedules the units as Ray tasks and its driver alone writes the store. ``--report-only`` rewrites
the report from whatever is stored; :func:`export_parquet` writes the rows for pandas/pyarrow.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import json
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from splitbits.attacks.defence import DefenceConfig
from splitbits.attacks.report import load_published, write_report
from splitbits.attacks.runner import (
    PointResult,
    RuntimeMeter,
    Target,
    evaluate_point,
    machine_info,
    pick_device,
    resolve_target,
)
from splitbits.attacks.threats import (
    CLEAN,
    RATE_TERMS,
    THREATS,
    AttackConfig,
    AttackConfigError,
    ThreatPoint,
    check_threat,
    parse_eps,
)
from splitbits.runtime.bundle import sha256_file
from splitbits.runtime.corruptions import CORRUPTIONS, SEVERITIES, CorruptionError, check_corruption
from splitbits.runtime.datasets import load_arrays
from splitbits.runtime.errors import SplitbitsError
from splitbits.runtime.progress import Bars
from splitbits.runtime.report import write_json
from splitbits.trainer.spec_cli import SPEC_KEYS, build_spec, spec_options

log = logging.getLogger(__name__)

DB_NAME = "results.sqlite"


class CampaignError(SplitbitsError, ValueError):
    """A campaign config or results store that cannot be used (raised before any work)."""


# --------------------------------------------------------------------------------------------
# Config schema
# --------------------------------------------------------------------------------------------

TOP_KEYS: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "name": ((str,), "campaign", "campaign name (report title)"),
    "description": ((str,), "", "free text"),
    "out": ((str,), None, "output folder (default runs/campaigns/NAME); --out overrides"),
    "models": ((list,), None, "checkpoints or bundles (a bundle names its checkpoint), or {checkpoint, bundle, "
                              "name, arch, family, num_classes, input_size} (the last four: sc2bench checkpoints)"),
    "dataset": ((str,), "builtin", "dataset spec: builtin, imagefolder:PATH, imagenet-c:PATH?..."),
    "split": ((str,), "val", "dataset split"),
    "image_size": ((int,), None, "image side; null: the model's input size"),
    "limit": ((int,), 256, "images per grid point (the first LIMIT of the split)"),
    "chunk": ((int,), 64, "images per stored row (the resume granularity)"),
    "batch": ((int,), 32, "images per attack batch (EOT multiplies it)"),
    "seed": ((int,), 0, "campaign seed (each unit derives its own)"),
    "device": ((str,), "auto", "auto, cpu or cuda (--shard I/N: cuda:I; --ray: a GPU per unit)"),
    "threads": ((int,), None, "torch CPU threads; null: leave as is"),
    "eps_unit": ((str,), "255", "ε values are k/255 ('255', the paper's notation) or fractions ('unit')"),
    "threats": ((list,), [{"name": "clean"}], "attacks: {name, eps: [..], steps, eot, ...}"),
    "corruptions": ((dict,), None, "{names: [..] | all, severities: [1..5], source: generate | imagenet-c:PATH}"),
    "defences": ((list,), ["none"], "none, oatv, tv, jpeg (name or {name, options})"),
    "paper": ((str,), None, "published figures (JSON, see paper_published.json) to put beside ours in the report"),
}
THREAT_KEYS = {"name", "eps", "steps", "step_size", "eot", "random_start", "terms", "quant", "band",
               "through", "through_grad", "keep_best", "defence", "schedule"}
CORRUPTION_KEYS = {"names", "severities", "source"}


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown(where: str, given: Iterable[str], known: Iterable[str]) -> None:
    known = list(known)
    for k in given:
        if k not in known:
            raise CampaignError(f"unknown key {where}{k!r}{_suggest(k, known)}; valid: {', '.join(sorted(known))}")


@dataclass
class Campaign:
    config: dict[str, Any]
    models: list[dict[str, Any]]
    points: list[ThreatPoint]
    defences: list[DefenceConfig]
    corruption_source: str


def _check_type(path: str, value: Any, types: tuple[type, ...]) -> None:
    if value is None:
        return
    if bool not in types and isinstance(value, bool):
        raise CampaignError(f"{path} must be {'/'.join(t.__name__ for t in types)}, got {value!r}")
    if float in types and isinstance(value, int):
        return
    if not isinstance(value, types):
        raise CampaignError(f"{path} must be {'/'.join(t.__name__ for t in types)}, got {type(value).__name__} "
                            f"{value!r}")


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _threat_points(i: int, raw: Any, eps_unit: str) -> list[ThreatPoint]:
    where = f"threats[{i}]"
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        raise CampaignError(f"{where} must be a mapping like {{name: pgd-e, eps: [8]}}, got {raw!r}")
    _unknown(f"{where}.", raw, THREAT_KEYS)
    name = raw.get("name")
    if name is None:
        raise CampaignError(f"{where} needs a name (one of {', '.join(THREATS)})")
    try:
        check_threat(name)
    except AttackConfigError as exc:
        if name in CORRUPTIONS:
            raise CampaignError(f"{where}: {name!r} is a corruption; list it under corruptions.names") from None
        raise CampaignError(f"{where}: {exc}") from None
    opts = {k: v for k, v in raw.items() if k not in ("name", "eps")}
    if "terms" in opts:
        opts["terms"] = tuple(_as_list(opts["terms"]))
        bad = [t for t in opts["terms"] if t not in RATE_TERMS]
        if bad:
            raise CampaignError(f"{where}.terms: unknown rate term {bad[0]!r}; use y and/or z")
    if "defence" in opts and not isinstance(opts["defence"], Mapping):
        raise CampaignError(f"{where}.defence must be a mapping of options of the defence attacked through")
    if name == "clean":
        eps_list = [0.0]
        if "eps" in raw:
            raise CampaignError(f"{where}: the clean point takes no eps")
    else:
        if "eps" not in raw:
            raise CampaignError(f"{where}: {name} needs eps (e.g. eps: [2, 4, 8, 16, 32] in units of 1/255)")
        try:
            eps_list = [parse_eps(e, eps_unit) for e in _as_list(raw["eps"])]
        except AttackConfigError as exc:
            raise CampaignError(f"{where}.eps: {exc}") from None
        if not eps_list:
            raise CampaignError(f"{where}.eps is empty")
    out = []
    for e in eps_list:
        try:
            out.append(ThreatPoint(attack=AttackConfig(name=name, eps=e, **opts)))
        except (AttackConfigError, TypeError) as exc:
            raise CampaignError(f"{where}: {exc}") from None
    return out


def _corruption_points(raw: Mapping[str, Any] | None) -> tuple[list[ThreatPoint], str]:
    if raw is None:
        return [], "generate"
    _unknown("corruptions.", raw, CORRUPTION_KEYS)
    names = raw.get("names", "all")
    names = list(CORRUPTIONS) if names == "all" else _as_list(names)
    sevs = _as_list(raw.get("severities", list(SEVERITIES)))
    source = str(raw.get("source", "generate"))
    if source != "generate" and not source.startswith("imagenet-c:"):
        raise CampaignError(f"corruptions.source must be 'generate' or 'imagenet-c:PATH', got {source!r}")
    out = []
    for n in names:
        for s in sevs:
            try:
                check_corruption(n, s)
            except CorruptionError as exc:
                raise CampaignError(f"corruptions: {exc}") from None
            out.append(ThreatPoint(corruption=n, severity=int(s)))
    if not out:
        raise CampaignError("corruptions: no corruption × severity selected")
    return out, source


def _model_entry(i: int, raw: Any, base: Path) -> dict[str, Any]:
    if isinstance(raw, str):
        raw = {"checkpoint": raw}
    if not isinstance(raw, Mapping):
        raise CampaignError(f"models[{i}] must be a path or {{checkpoint, bundle}}, got {raw!r}")
    _unknown(f"models[{i}].", raw, ("checkpoint", "bundle", "name", *SPEC_KEYS))
    if "checkpoint" not in raw:
        raise CampaignError(f"models[{i}] needs a checkpoint (or a bundle path)")
    try:  # an sc2bench checkpoint carries no spec: arch/family/num_classes/input_size (a bundle has one)
        spec = spec_options(*(raw.get(k) for k in SPEC_KEYS))
    except ValueError as exc:
        raise CampaignError(f"models[{i}]: {exc}") from None

    def resolve(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() or q.exists() else (base / q)

    ck = resolve(str(raw["checkpoint"]))
    if not ck.exists():
        raise CampaignError(f"models[{i}]: {raw['checkpoint']} not found")
    bd = resolve(str(raw["bundle"])) if raw.get("bundle") else None
    if bd is not None and not bd.is_dir():
        raise CampaignError(f"models[{i}]: bundle {raw['bundle']} not found")
    return {"path": str(ck), "bundle": str(bd) if bd else None, "name": raw.get("name"), "spec": spec}


def parse_campaign(raw: Mapping[str, Any], base: Path | None = None) -> Campaign:
    """Validate a campaign mapping completely (but open no model and no dataset)."""
    if not isinstance(raw, Mapping):
        raise CampaignError("a campaign config must be a YAML mapping")
    base = base or Path.cwd()
    _unknown("", raw, TOP_KEYS)
    cfg: dict[str, Any] = {}
    for k, (types, default, _) in TOP_KEYS.items():
        v = raw.get(k, copy.deepcopy(default))
        _check_type(k, v, types)
        cfg[k] = v
    if not cfg["models"]:
        raise CampaignError("models: give at least one checkpoint or bundle")
    for k in ("limit", "chunk", "batch"):
        if cfg[k] < 1:
            raise CampaignError(f"{k} must be >= 1, got {cfg[k]}")
    if cfg["image_size"] is not None and cfg["image_size"] < 1:
        raise CampaignError("image_size must be >= 1")
    if cfg["eps_unit"] not in ("255", "unit"):
        raise CampaignError(f"eps_unit must be '255' or 'unit', got {cfg['eps_unit']!r}")
    if cfg["device"] != "auto" and not cfg["device"].startswith(("cpu", "cuda")):
        raise CampaignError(f"device must be auto, cpu or cuda[:N], got {cfg['device']!r}")
    models = [_model_entry(i, m, base) for i, m in enumerate(cfg["models"])]
    points: list[ThreatPoint] = []
    for i, t in enumerate(cfg["threats"] or []):
        points += _threat_points(i, t, cfg["eps_unit"])
    if not any(p.threat == "clean" for p in points):
        points.insert(0, CLEAN)
    cpoints, source = _corruption_points(cfg["corruptions"])
    points += cpoints
    keys = [p.key() for p in points]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise CampaignError(f"threats: the same point is listed twice ({sorted(dup)[0]})")
    defences = []
    for i, d in enumerate(cfg["defences"] or ["none"]):
        try:
            defences.append(DefenceConfig.parse(d))
        except (ValueError, TypeError) as exc:
            raise CampaignError(f"defences[{i}]: {exc}") from None
    if not any(d.name == "none" for d in defences):
        defences.insert(0, DefenceConfig(name="none"))
    labels = [d.label for d in defences]
    if len(set(labels)) != len(labels):
        raise CampaignError(f"defences: the same defence is listed twice ({labels})")
    if cfg["paper"] is not None:
        cfg["paper"] = str(_published_path(cfg["paper"], base))
    return Campaign(cfg, models, points, defences, source)


def _published_path(name: str, base: Path) -> Path:
    """``paper:`` as given (absolute or from the working directory), else beside the config, else shipped."""
    for p in (Path(name).expanduser(), base / name, Path(__file__).parent / "campaigns" / name):
        if p.is_file():
            try:
                load_published(p)
            except ValueError as exc:
                raise CampaignError(str(exc)) from None
            return p
    raise CampaignError(f"paper: {name} not found (absolute, from the working directory, beside the config, "
                        "or shipped in attacks/campaigns)")


def load_campaign(path: str | os.PathLike) -> Campaign:
    """Read and validate a campaign YAML file (relative model paths are relative to its folder)."""
    p = Path(path)
    if not p.is_file():
        raise CampaignError(f"campaign config not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except UnicodeDecodeError as exc:
        raise CampaignError(f"{p}: not a text (YAML) file ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise CampaignError(f"{p}: not valid YAML ({exc})") from exc
    return parse_campaign(raw or {}, base=p.parent)


def output_dir(c: Campaign, out: str | os.PathLike | None = None) -> Path:
    """``out``, else the config's ``out``, else ``runs/campaigns/NAME``."""
    return Path(out or c.config["out"] or Path("runs") / "campaigns" / c.config["name"])


# --------------------------------------------------------------------------------------------
# Results store
# --------------------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    row_key TEXT PRIMARY KEY, unit_key TEXT NOT NULL, model_id TEXT NOT NULL, model TEXT NOT NULL,
    family TEXT, beta REAL, threat TEXT NOT NULL, eps REAL, level TEXT NOT NULL, corruption TEXT,
    severity INTEGER, defence TEXT NOT NULL, chunk INTEGER NOT NULL, n INTEGER NOT NULL,
    bytes_mean REAL, surrogate_bytes_mean REAL, correct INTEGER, edge_ms_p50 REAL, defence_ms REAL,
    attack_s REAL, objective TEXT, objective_clean REAL, objective_adv REAL, loss_rose INTEGER,
    data TEXT NOT NULL, rank INTEGER, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS results_unit ON results(unit_key);
CREATE TABLE IF NOT EXISTS shards (rank INTEGER PRIMARY KEY, world INTEGER, status TEXT, finished REAL,
                                   host TEXT);
"""


class ResultStore:
    """SQLite rows; a unit's rows are written in one transaction; safe for several processes (WAL)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = sqlite3.connect(self.path, timeout=120.0, isolation_level=None)
        self.con.execute("PRAGMA busy_timeout=120000")
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.executescript(SCHEMA)
        if "host" not in {r[1] for r in self.con.execute("PRAGMA table_info(shards)")}:  # a store of before 0.1
            self.con.execute("ALTER TABLE shards ADD COLUMN host TEXT")

    def close(self) -> None:
        self.con.close()

    def get_meta(self, key: str) -> str | None:
        row = self.con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def done_units(self, defences: Iterable[str]) -> set[str]:
        """Units that have a row for every one of ``defences`` (labels)."""
        need = set(defences)
        have: dict[str, set[str]] = {}
        for unit, d in self.con.execute("SELECT unit_key, defence FROM results"):
            have.setdefault(unit, set()).add(d)
        return {u for u, ds in have.items() if need <= ds}

    def write_unit(self, rows: list[dict[str, Any]]) -> None:
        cols = list(rows[0])
        sql = f"INSERT OR IGNORE INTO results({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
        self.con.execute("BEGIN IMMEDIATE")
        try:
            self.con.executemany(sql, [tuple(r[c] for c in cols) for r in rows])
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    def rows(self) -> list[dict[str, Any]]:
        cur = self.con.execute("SELECT * FROM results ORDER BY model_id, threat, eps, corruption, severity, "
                               "defence, chunk")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def count(self) -> int:
        return int(self.con.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def mark_shard(self, rank: int, world: int, status: str) -> None:
        self.con.execute("INSERT OR REPLACE INTO shards(rank, world, status, finished, host) VALUES (?, ?, ?, ?, ?)",
                         (rank, world, status, time.time(), socket.gethostname()))

    def shard_hosts(self) -> set[str]:
        """Hosts that have run a shard on this store (one, or the store is shared across machines)."""
        return {h for (h,) in self.con.execute("SELECT host FROM shards WHERE host IS NOT NULL")}

    def shard_status(self) -> dict[int, str]:
        return dict(self.con.execute("SELECT rank, status FROM shards").fetchall())


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


@dataclass
class Unit:
    model_index: int
    point: ThreatPoint
    chunk: int
    start: int
    stop: int

    def key(self, model_id: str) -> str:
        return f"{model_id}|{self.point.key()}|chunk{self.chunk}"


def parse_shard(shard: str | None = None) -> tuple[int, int]:
    """(rank, world) from ``--shard I/N``; (0, 1) without one."""
    if not shard:
        return 0, 1
    try:
        r, _, w = shard.partition("/")
        rank, world = int(r), int(w)
    except ValueError:
        raise CampaignError(f"--shard must be I/N (e.g. 0/4), got {shard!r}") from None
    if not 0 <= rank < world:
        raise CampaignError(f"--shard {shard}: need 0 <= I < N")
    return rank, world


def _frame(c: Campaign) -> dict[str, Any]:
    cfg = c.config
    return {k: cfg[k] for k in ("dataset", "split", "image_size", "limit", "chunk", "seed")} | {
        "corruption_source": c.corruption_source}


def _unit_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{key}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def _model_id(path: str, spec: dict[str, Any] | None = None) -> str:
    """The stored rows' model key: sha256 of the checkpoint (or of a bundle's manifest), and of the
    spec an sc2bench checkpoint is rebuilt with."""
    p = Path(path)
    digest = sha256_file(p if p.is_file() else p / "manifest.json")
    if spec:
        digest = hashlib.sha256((digest + json.dumps(spec, sort_keys=True)).encode()).hexdigest()
    return digest[:12]


def current_points(c: Campaign, model_ids: list[str] | None = None) -> set[str]:
    """``model_id|point key`` of every grid point of this config (what its report covers)."""
    mids = model_ids if model_ids is not None else [_model_id(m["path"], m["spec"]) for m in c.models]
    return {f"{mid}|{p.key()}" for mid in mids for p in c.points}


def plan_units(c: Campaign) -> list[Unit]:
    limit, chunk = c.config["limit"], c.config["chunk"]
    units = []
    for mi in range(len(c.models)):
        for p in c.points:
            for k, s in enumerate(range(0, limit, chunk)):
                units.append(Unit(mi, p, k, s, min(limit, s + chunk)))
    return units


class _Data:
    """Images per (image size, corruption source) loaded once; an empty dataset is an error up front."""

    def __init__(self, c: Campaign) -> None:
        self.c = c
        self.cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, size: int, point: ThreatPoint) -> tuple[np.ndarray, np.ndarray, ThreatPoint]:
        """(images, labels, what is left to do to them): a corruption read pre-corrupted from an
        ImageNet-C folder leaves nothing (:data:`CLEAN`)."""
        cfg = self.c.config
        spec, key, todo = cfg["dataset"], (size, None, None), point
        if point.corruption is not None and self.c.corruption_source != "generate":
            spec = f"{self.c.corruption_source}?corruption={point.corruption}&severity={point.severity}"
            key, todo = (size, point.corruption, point.severity), CLEAN
        if key not in self.cache:
            self.cache[key] = load_arrays(spec, cfg["split"], cfg["image_size"] or size, cfg["limit"])
            if len(self.cache[key][0]) < cfg["limit"]:
                log.warning("dataset %s has only %d images (limit %d)", spec, len(self.cache[key][0]), cfg["limit"])
        return (*self.cache[key], todo)


def open_store(c: Campaign, out: Path, rank: int, fresh: bool) -> ResultStore:
    """``out/results.sqlite`` of this config's frame (dataset, limit, chunk, seed); ``fresh`` (rank 0)
    discards it first; a store of another frame is refused."""
    db_path = out / DB_NAME
    if fresh and rank == 0 and db_path.exists():
        for suffix in ("", "-wal", "-shm"):
            Path(str(db_path) + suffix).unlink(missing_ok=True)
    store = ResultStore(db_path)
    frame = json.dumps(_frame(c), sort_keys=True)
    old = store.get_meta("frame")
    if old is not None and old != frame:
        store.close()
        raise CampaignError(f"{db_path} holds results of a different dataset/limit/chunk/seed ({old}); "
                            "use another --out or --fresh")
    if rank == 0:
        store.set_meta("frame", frame)
        store.set_meta("config", json.dumps(c.config, sort_keys=True, default=str))
        store.set_meta("defences", json.dumps([d.to_dict() for d in c.defences]))
    return store


def _targets(c: Campaign, dev: torch.device) -> list[tuple[Target, str]]:
    """(target, model id) of every model, checked (bundle matches checkpoint) on ``dev``."""
    targets = []
    for m in c.models:
        t = resolve_target(m["bundle"] or m["path"], checkpoint=m["path"] if m["bundle"] else None, device=dev,
                           spec=build_spec(m["spec"]))
        if m["name"]:
            t.name = m["name"]
        targets.append((t, _model_id(m["path"], m["spec"])))
    return targets


def run_campaign(c: Campaign, out: str | os.PathLike, *, fresh: bool = False, shard: str | None = None,
                 device: str | None = None, progress: bool = True,
                 on_unit: Callable[[Unit, int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the campaign (this process's ``--shard I/N``, default all of it) into ``out``;
    returns counts and writes them with the machine to ``out/run_rankR.json``; the last shard to
    finish writes the report.

    ``on_unit(unit, n_computed)`` is called after each stored unit (progress hooks, tests).
    """
    out = Path(out)
    rank, world = parse_shard(shard)
    if c.config["threads"]:
        torch.set_num_threads(int(c.config["threads"]))
    dev = pick_device(device or c.config["device"])
    if dev.type == "cuda" and world > 1 and dev.index is None:
        dev = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
    store = open_store(c, out, rank, fresh)
    try:
        if world > 1:
            _check_one_host(store, out)
        ctx = UnitContext(c, dev)  # everything that can fail on bad input fails here, before the first attack
        units = plan_units(c)
        mine = [u for i, u in enumerate(units) if i % world == rank]
        done = store.done_units(d.label for d in c.defences)
        todo = [u for u in mine if ctx.key(u) not in done]
        log.info("campaign %s: %d units, shard %d/%d has %d, %d already stored, %d to run",
                 c.config["name"], len(units), rank, world, len(mine), len(mine) - len(todo), len(todo))
        computed = _run_units(ctx, store, todo, (rank, world), progress and rank == 0, on_unit)
        summary = {"units": len(units), "shard_units": len(mine), "computed": computed,
                   "skipped": len(mine) - len(todo), "rows": store.count(), "rank": rank, "world": world}
        status = store.shard_status()
        if all(status.get(r) == "done" for r in range(world)):  # the last shard to finish writes the report
            files = report_campaign(c, out, store, [m for _, m in ctx.targets])
            summary["report"] = {k: str(v) for k, v in files.items()}
        else:
            log.info("shards %s still running; the last one to finish writes the report",
                     [r for r in range(world) if status.get(r) != "done"])
    finally:
        store.close()
    summary["machine"] = machine_info()
    write_json(out / f"run_rank{rank}.json", summary)
    return summary


def _check_one_host(store: ResultStore, out: Path) -> None:
    """Shards share the SQLite file in WAL mode, which needs shared memory: one host only."""
    others = store.shard_hosts() - {socket.gethostname()}
    if others:
        raise CampaignError(f"shards of {out} ran on {', '.join(sorted(others))}: --shard I/N runs on one host "
                            "(SQLite's WAL needs shared memory); across machines use --ray, or start over with --fresh")


class UnitContext:
    """What a process needs to compute units of a campaign: its checked targets, the images and a
    runtime meter per model (built once, reused for every unit it computes)."""

    def __init__(self, c: Campaign, dev: torch.device) -> None:
        self.c = c
        self.targets, self.data = _targets(c, dev), _Data(c)
        for t, _ in self.targets:
            self.data.get(t.model.spec.input_size, CLEAN)
        self.meters: dict[int, RuntimeMeter] = {}

    def key(self, u: Unit) -> str:
        return u.key(self.targets[u.model_index][1])

    def compute(self, u: Unit, rank: int | None, progress: Callable[[int], None] | None = None
                ) -> list[dict[str, Any]]:
        """The rows of unit ``u`` (one per defence; none if the dataset has no image in its range)."""
        t, mid = self.targets[u.model_index]
        if u.model_index not in self.meters:
            self.meters[u.model_index] = RuntimeMeter(t.bundle)
        imgs, labels, point = self.data.get(t.model.spec.input_size, u.point)
        sl = slice(u.start, min(u.stop, len(imgs)))
        if sl.start >= sl.stop:
            return []
        ukey = u.key(mid)
        res = evaluate_point(t, self.meters[u.model_index], imgs[sl], labels[sl], point, self.c.defences,
                             seed=_unit_seed(self.c.config["seed"], ukey), indices=np.arange(sl.start, sl.stop),
                             batch=self.c.config["batch"], progress=progress)
        return _rows(ukey, mid, t, u, res, rank)


def _run_units(ctx: UnitContext, store: ResultStore, todo: list[Unit], shard: tuple[int, int], progress: bool,
               on_unit: Callable[[Unit, int], None] | None) -> int:
    """Compute and store ``todo`` in order (one transaction per unit); returns how many were stored.
    The shard is marked running, then done, or failed if anything (even ^C) interrupts it."""
    rank, world = shard
    c = ctx.c
    computed = 0
    store.mark_shard(rank, world, "running")
    try:
        with Bars(progress, unit="images") as bars:
            task = bars.add(f"campaign {c.config['name']}", sum(u.stop - u.start for u in todo))
            for u in todo:
                rows = ctx.compute(u, rank, progress=lambda n: bars.advance(task, n))
                if not rows:
                    continue
                store.write_unit(rows)
                computed += 1
                if on_unit is not None:
                    on_unit(u, computed)
        store.mark_shard(rank, world, "done")
    except BaseException:
        store.mark_shard(rank, world, "failed")
        raise
    return computed


def report_campaign(c: Campaign, out: str | os.PathLike, store: ResultStore | None = None,
                    model_ids: list[str] | None = None) -> dict[str, Path]:
    """Write ``out/report.{md,html,json}`` and the plots for this config's points and defences from
    the stored rows (``store``, else ``out/results.sqlite``, which must exist)."""
    if store is None:
        db = Path(out) / DB_NAME
        if not db.is_file():
            raise CampaignError(f"no results in {out} (nothing to report)")
        with contextlib.closing(ResultStore(db)) as st:
            rows = st.rows()
    else:
        rows = store.rows()
    published = load_published(c.config["paper"]) if c.config.get("paper") else None
    return write_report(rows, out, title=c.config["name"], points=current_points(c, model_ids),
                        defences={d.label for d in c.defences}, published=published)


def export_parquet(out: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Write every stored row of ``out/results.sqlite`` to ``path`` (default ``out/results.parquet``)
    for analysis with pandas/pyarrow (the ``cluster`` extra); ``data`` stays a JSON string."""
    import pandas as pd

    db = Path(out) / DB_NAME
    if not db.is_file():
        raise CampaignError(f"no results in {out} (nothing to export)")
    with contextlib.closing(ResultStore(db)) as st:
        frame = pd.DataFrame(st.rows())
    dst = Path(path) if path is not None else Path(out) / "results.parquet"
    dst.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(dst, index=False)
    return dst


def _rows(ukey: str, mid: str, t: Target, u: Unit, res: PointResult, rank: int | None) -> list[dict[str, Any]]:
    rows = []
    p = u.point
    att = res.attack
    for label, m in res.defended.items():
        data = m.to_json() | {"labels": res.labels.tolist()}
        rows.append({
            "row_key": f"{ukey}|{label}", "unit_key": ukey, "model_id": mid, "model": t.name,
            "family": t.family, "beta": t.beta, "threat": p.threat, "eps": p.eps, "level": p.level,
            "corruption": p.corruption, "severity": p.severity, "defence": label, "chunk": u.chunk,
            "n": int(m.bytes.size), "bytes_mean": float(m.bytes.mean()),
            "surrogate_bytes_mean": float(m.surrogate_bytes.mean()),
            "correct": int((m.preds == res.labels).sum()), "edge_ms_p50": float(np.median(m.edge_ms)),
            "defence_ms": m.defence_ms, "attack_s": att.get("seconds"), "objective": att.get("objective"),
            "objective_clean": att.get("clean_objective_mean"), "objective_adv": att.get("adv_objective_mean"),
            "loss_rose": None if att.get("loss_rose") is None else int(att["loss_rose"]),
            "data": json.dumps(data), "rank": rank, "created": time.time(),
        })
    return rows
