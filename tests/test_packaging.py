"""pyproject.toml lists every subpackage and data folder, so a wheel (not only an editable install) is complete."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = (".py", ".yaml", ".sh", ".md")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_folder_with_code_or_data_is_a_listed_package() -> None:
    st = _setuptools()
    listed = set(st["packages"])
    missing = []
    for pkg, folder in st["package-dir"].items():
        for d in [ROOT / folder, *(p for p in (ROOT / folder).rglob("*") if p.is_dir())]:
            if "__pycache__" in d.parts or not any(f.suffix in SHIPPED for f in d.iterdir() if f.is_file()):
                continue
            name = ".".join([pkg, *d.relative_to(ROOT / folder).parts])
            if name not in listed:
                missing.append(name)
    assert not missing, f"add to [tool.setuptools] packages: {missing}"


def test_package_data_patterns_match_files() -> None:
    st = _setuptools()
    dirs = {pkg: ROOT / folder for pkg, folder in st["package-dir"].items()}
    for pkg, patterns in st["package-data"].items():
        top = next(p for p in dirs if pkg == p or pkg.startswith(p + "."))
        folder = dirs[top].joinpath(*pkg[len(top) + 1:].split(".")) if pkg != top else dirs[top]
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"{pkg}: {pattern} matches nothing in {folder}"
