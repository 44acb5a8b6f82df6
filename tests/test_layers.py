"""The package layers (import contracts) and the one command protocol."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from splitbits.runtime import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "trainer", "export", "attacks", "jetson", "cluster")


def test_import_contracts_hold():
    """import-linter over the contracts in pyproject.toml: one direction only, no cycles, no torch in runtime."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is not installed (it is in the dev extra)"
    res = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_every_command_is_registered_once_by_its_packages_commands_module():
    eps = list(entry_points(group=cli.ENTRY_POINT_GROUP))
    assert len({ep.name for ep in eps}) == len(eps)
    declared = {}
    for pkg in PACKAGES:
        mod = __import__(f"splitbits.{pkg}.commands", fromlist=["COMMANDS"])
        for name, cmd in mod.COMMANDS.items():
            assert isinstance(cmd, cli.Command), name
            declared[name] = mod.__name__
    assert {ep.name: ep.module for ep in eps} == declared
    assert not [p for p in ROOT.glob("*/cli*.py") if p.parent.name != "runtime"]  # no other registration modules


def test_commands_modules_import_no_heavy_dependency():
    """``splitbits --help`` must work on a device: commands modules import the standard library only."""
    code = ("import sys; from splitbits.runtime.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'compressai', 'onnxruntime', 'numba', 'numpy') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_a_command_whose_module_fails_to_import_is_listed_as_unavailable(monkeypatch, capsys):
    real = entry_points

    class Broken:
        name, module, group = "broken", "splitbits_no_such_module.commands", cli.ENTRY_POINT_GROUP

    def fake(group=None):
        return [*real(group=group), Broken()]

    monkeypatch.setattr("importlib.metadata.entry_points", fake)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "broken" in capsys.readouterr().out
    assert cli.main(["broken", "x"]) == 2
    err = capsys.readouterr().err
    assert "'broken' is unavailable in this installation: ModuleNotFoundError" in err


def test_a_groups_first_word_goes_to_its_default_target():
    parser = cli.build_parser()
    assert cli._with_default_targets(["bench", "runs/b", "--limit", "2"], parser) == \
        ["bench", "bundle", "runs/b", "--limit", "2"]
    assert cli._with_default_targets(["-v", "bench", "codec", "--images", "1"], parser) == \
        ["-v", "bench", "codec", "--images", "1"]
    args = parser.parse_args(cli._with_default_targets(["bench", "B", "--limit", "3"], parser))
    assert isinstance(args, argparse.Namespace) and args.bundle == "B" and args.limit == 3


def test_device_alone_or_with_options_is_device_info():
    parser = cli.build_parser()
    assert cli._with_default_targets(["device"], parser) == ["device", "info"]
    assert cli._with_default_targets(["device", "--json", "f"], parser) == ["device", "info", "--json", "f"]
    assert cli._with_default_targets(["device", "--help"], parser) == ["device", "--help"]
    assert cli._with_default_targets(["bench"], parser) == ["bench"]  # bench alone: its help, not a bundle


def test_a_group_without_its_target_prints_the_groups_help(capsys):
    assert cli.main(["bench"]) == 2
    assert "TARGET" in capsys.readouterr().out
