"""Both ways of installing (pip via pyproject, distributions via meson) ship every module."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import setuptools

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "daemon" / "uplinkd"


def test_meson_installs_every_python_source() -> None:
    listed = set(re.findall(r"'(daemon/uplinkd/[^']+)'", (ROOT / "meson.build").read_text()))
    present = {
        str(path.relative_to(ROOT))
        for path in PACKAGE.rglob("*")
        if path.suffix == ".py" or path.name == "py.typed"
    }
    assert present - listed == set(), "add these to meson.build's install_sources"
    assert listed - present == set(), "meson.build names files that do not exist"


def test_pyproject_finds_the_package_and_its_entry_points() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["package-dir"] == {"": "daemon"}
    scripts = project["project"]["scripts"]
    assert scripts == {"uplinkd": "uplinkd.cli:main", "uplinkctl": "uplinkd.ctl:main"}
    for target in scripts.values():
        module = target.split(":")[0].replace(".", "/")
        assert (ROOT / "daemon" / f"{module}.py").is_file()


def test_pip_install_holds_the_daemon_and_the_lab_distribution_the_lab() -> None:
    """`pip install .` ships uplinkd's packages alone (a router gets no lab, no test code);
    daemon/lab's own pyproject ships the lab alone. Found as setuptools finds them."""
    daemon = {
        ".".join(init.parent.relative_to(ROOT / "daemon").parts)
        for init in PACKAGE.rglob("__init__.py")
    }
    for where, expected in ((ROOT, daemon), (ROOT / "daemon" / "lab", {"uplinkd_lab"})):
        project = tomllib.loads((where / "pyproject.toml").read_text())
        find = project["tool"]["setuptools"]["packages"]["find"]
        found = setuptools.find_packages(where=where / find["where"][0], include=find["include"])
        assert set(found) == expected, where
