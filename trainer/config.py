"""Training configs: YAML files with a strict schema, builtin presets and ``section.key=value`` overrides.

A config is a two-level mapping. ``kind: teacher`` configs have the sections ``model``, ``data``
and ``train``; ``kind: student`` configs have ``model``, ``data``, ``student``, ``stage1`` and
``stage2``. Every key is checked against :data:`SCHEMA` (unknown keys and wrong types are errors
that name the key and suggest the closest valid one) and missing keys take their defaults, so
``validate_config`` returns a complete config that is stored verbatim in the checkpoint.

Builtin presets live in ``splitbits/trainer/configs/*.yaml`` (``list_builtin_configs()``).
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from splitbits.runtime.errors import SplitbitsError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PAPER_BETAS = (0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class ConfigError(SplitbitsError, ValueError):
    """A config that is malformed, has unknown keys or values of the wrong type."""


@dataclass(frozen=True)
class Field:
    """One config key: accepted types, default, optional choices / check, and a one-line help."""

    types: tuple[type, ...]
    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _unit(v: Any) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be within [0, 1]"


def _int_list(v: Any) -> str | None:
    return None if all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v) \
        else "must be a list of positive integers"


INT, FLOAT, STR, BOOL = (int,), (int, float), (str,), (bool,)

_OPTIM = {
    "epochs": Field(INT, 10, "number of epochs", check=_non_negative),
    "optimizer": Field(STR, "sgd", "optimizer", choices=("sgd", "adam", "adamw")),
    "lr": Field(FLOAT, 0.1, "peak learning rate", check=_positive),
    "momentum": Field(FLOAT, 0.9, "SGD momentum", check=_non_negative),
    "nesterov": Field(BOOL, True, "Nesterov momentum (SGD)"),
    "weight_decay": Field(FLOAT, 5e-4, "weight decay", check=_non_negative),
    "schedule": Field(STR, "cosine", "per-step LR schedule", choices=("constant", "cosine", "multistep")),
    "milestones": Field((list,), [], "epochs at which multistep multiplies the LR by gamma", check=_int_list),
    "gamma": Field(FLOAT, 0.1, "multistep factor", check=_positive),
    "warmup_epochs": Field(FLOAT, 0.0, "linear warm-up length in epochs (fractions allowed)",
                           check=_non_negative),
    "grad_clip": Field(FLOAT, None, "clip the gradient norm to this value", nullable=True, check=_positive),
    "limit_batches": Field(INT, None, "stop each epoch after this many batches (smoke tests)",
                           nullable=True, check=_positive),
    "batch_size": Field(INT, None, "training batch size of this stage; null: data.batch_size", nullable=True,
                        check=_positive),
    "eval_every": Field(INT, 0, "also evaluate every N epochs (0: only at the end)", check=_non_negative),
}

SCHEMA: dict[str, dict[str, Field]] = {
    "model": {
        "arch": Field(STR, "tiny", "backbone", choices=("tiny", "resnet50", "resnet101", "regnety_064")),
        "family": Field(STR, None, "entropy model of a student (fp or mshp); null for a teacher",
                        choices=("fp", "mshp"), nullable=True),
        "num_classes": Field(INT, None, "classes; null: taken from the dataset", nullable=True,
                             check=lambda v: None if v >= 2 else "must be >= 2"),
        "tiny_widths": Field((list,), None, "channel widths of the tiny ResNet's three stages",
                             nullable=True, check=lambda v: _int_list(v) or (None if len(v) == 3 else
                                                                             "must have 3 entries")),
        "bottleneck": Field((dict,), {}, "keyword overrides of the bottleneck (see models.default_bottleneck)"),
    },
    "data": {
        "dataset": Field(STR, None, "builtin[:seed=N], imagefolder:PATH (train and val)", nullable=True),
        "image_size": Field(INT, None, "input side; null: 64 for builtin, 224 otherwise", nullable=True,
                            check=_positive),
        "batch_size": Field(INT, 128, "training batch size per process", check=_positive),
        "eval_batch_size": Field(INT, 256, "evaluation batch size per process", check=_positive),
        "workers": Field(INT, None, "DataLoader workers; null: 0 for builtin, min(8, CPUs) otherwise",
                         nullable=True, check=_non_negative),
        "augment": Field(STR, "auto", "train augmentation: auto (light for builtin, imagenet otherwise)",
                         choices=("auto", "none", "light", "imagenet")),
        "train_limit": Field(INT, None, "use only the first N training images", nullable=True, check=_positive),
        "val_limit": Field(INT, None, "evaluate on the first N validation images", nullable=True,
                           check=_positive),
        "jpeg_reference_images": Field(INT, 500, "val images JPEG-encoded (q75) as a size reference; 0: off",
                                       check=_non_negative),
    },
    "train": {
        **_OPTIM,
        "label_smoothing": Field(FLOAT, 0.0, "cross-entropy label smoothing", check=_unit),
    },
    "student": {
        "beta": Field(FLOAT, 0.16, "rate weight β (paper: 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)",
                      check=_non_negative),
        "teacher": Field(STR, None, "teacher checkpoint (overridden by --teacher)", nullable=True),
    },
    "stage1": {
        **_OPTIM,
        "optimizer": Field(STR, "adam", "optimizer", choices=("sgd", "adam", "adamw")),
        "lr": Field(FLOAT, 1e-3, "peak learning rate", check=_positive),
        "weight_decay": Field(FLOAT, 0.0, "weight decay", check=_non_negative),
        "schedule": Field(STR, "multistep", "per-step LR schedule", choices=("constant", "cosine", "multistep")),
        "aux_lr": Field(FLOAT, 1e-3, "learning rate of the quantile (aux) optimizer", check=_positive),
        "update_quantiles": Field(BOOL, True, "fit the quantiles exactly (bisection) in the final update()"),
        "distill": Field(STR, "all", "feature distillation: split (bottleneck output only) or all "
                         "(also every later stage through the frozen rest, as sc2bench)",
                         choices=("split", "all")),
    },
    "stage2": {
        **_OPTIM,
        "lr": Field(FLOAT, 1e-3, "peak learning rate", check=_positive),
        "schedule": Field(STR, "multistep", "per-step LR schedule", choices=("constant", "cosine", "multistep")),
        "temperature": Field(FLOAT, 1.0, "KD temperature", check=_positive),
        "alpha": Field(FLOAT, 0.5, "KD mix: alpha·CE + (1−alpha)·T²·KL (torchdistill KDLoss)", check=_unit),
    },
}

TOP_LEVEL = {
    "kind": Field(STR, None, "teacher or student", choices=("teacher", "student")),
    "description": Field(STR, "", "free text"),
    "seed": Field(INT, 0, "random seed", check=_non_negative),
}
SECTIONS = {"teacher": ("model", "data", "train"), "student": ("model", "data", "student", "stage1", "stage2")}


def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_value(path: str, f: Field, value: Any) -> Any:
    if value is None:
        if f.nullable:
            return None
        raise ConfigError(f"{path} must not be null")
    if f.types == FLOAT and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, f.types) and not (isinstance(value, bool) and bool not in f.types)
    if not ok:
        names = "/".join(t.__name__ for t in f.types)
        raise ConfigError(f"{path} must be {names}, got {type(value).__name__} {value!r}")
    if f.choices is not None and value not in f.choices:
        raise ConfigError(f"{path} must be one of {', '.join(map(str, f.choices))}, got {value!r}"
                          + (_suggest(value, f.choices) if isinstance(value, str) else ""))
    if f.check is not None:
        problem = f.check(value)
        if problem:
            raise ConfigError(f"{path} {problem}, got {value!r}")
    return copy.deepcopy(value)


def validate_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``raw`` strictly and return a complete copy with every default filled in."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping, got {type(raw).__name__}")
    kind = raw.get("kind")
    if kind not in SECTIONS:
        raise ConfigError(f"config key 'kind' must be teacher or student, got {kind!r}")
    allowed = set(TOP_LEVEL) | set(SECTIONS[kind])
    for key in raw:
        if key not in allowed:
            if key in SCHEMA:
                raise ConfigError(f"section {key!r} does not belong in a {kind} config "
                                  f"(sections: {', '.join(SECTIONS[kind])})")
            raise ConfigError(f"unknown config key {key!r}{_suggest(str(key), allowed)}")
    out: dict[str, Any] = {}
    for key, f in TOP_LEVEL.items():
        out[key] = _check_value(key, f, raw.get(key, f.default))
    for section in SECTIONS[kind]:
        given = raw.get(section) or {}
        if not isinstance(given, Mapping):
            raise ConfigError(f"section {section!r} must be a mapping, got {type(given).__name__}")
        fields = SCHEMA[section]
        for key in given:
            if key not in fields:
                raise ConfigError(f"unknown key {section}.{key}{_suggest(str(key), fields)}; "
                                  f"valid keys: {', '.join(fields)}")
        out[section] = {k: _check_value(f"{section}.{k}", f, given.get(k, f.default)) for k, f in fields.items()}
    model = out["model"]
    if kind == "teacher" and model["family"] is not None:
        raise ConfigError("a teacher config has model.family: null (a family makes it a student)")
    if kind == "student" and model["family"] is None:
        raise ConfigError("a student config needs model.family: fp or mshp")
    if model["tiny_widths"] is not None and model["arch"] != "tiny":
        raise ConfigError("model.tiny_widths applies only to arch: tiny")
    for section in ("train", "stage1", "stage2"):
        if section in out and out[section]["schedule"] == "multistep" and not out[section]["milestones"]:
            raise ConfigError(f"{section}.schedule multistep needs {section}.milestones (epochs)")
    return out


def list_builtin_configs() -> list[str]:
    """Names of the presets shipped in ``splitbits/trainer/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def read_config_file(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """Parse a preset name (``tiny_mshp``) or a YAML path, without validation."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.is_file():
        preset = CONFIG_DIR / f"{text}.yaml"
        if text.endswith((".yaml", ".yml")) or os.sep in text or not preset.is_file():
            names = list_builtin_configs()
            raise ConfigError(f"config {text!r} is neither a file nor a builtin config"
                              f"{_suggest(text, names)}; builtin: {', '.join(names)}")
        path = preset
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping")
    return data


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` (or ``key=value`` for top-level keys); values are parsed as YAML."""
    out = copy.deepcopy(dict(raw))
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. student.beta=0.32)")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        parts = key.split(".")
        if len(parts) == 1:
            if parts[0] not in TOP_LEVEL:
                hint = _suggest(parts[0], list(TOP_LEVEL) + list(SCHEMA))
                raise ConfigError(f"override {key!r}: use section.key for section keys{hint}")
            out[parts[0]] = value
        elif len(parts) == 2:
            section, name = parts
            if section not in SCHEMA:
                raise ConfigError(f"override {key!r}: unknown section {section!r}{_suggest(section, SCHEMA)}")
            if name not in SCHEMA[section]:
                raise ConfigError(f"override {key!r}: unknown key {name!r}{_suggest(name, SCHEMA[section])}")
            sec = out.setdefault(section, {})
            if not isinstance(sec, dict):
                raise ConfigError(f"override {key!r}: section {section!r} is not a mapping")
            sec[name] = value
        else:
            raise ConfigError(f"override {key!r}: keys have the form section.key")
    return out


def load_config(name_or_path: str | os.PathLike | Mapping[str, Any],
                overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Preset name, YAML path or mapping → overrides applied → validated complete config."""
    raw = dict(name_or_path) if isinstance(name_or_path, Mapping) else read_config_file(name_or_path)
    return validate_config(apply_overrides(raw, overrides))


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """``section.key`` paths whose values differ between two validated configs."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += [f"{key}.{k}" for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
        elif va != vb:
            out.append(key)
    return out
