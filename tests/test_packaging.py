"""The distribution installs the four folders under the apexdsp namespace, and nothing generic at top level."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"programs": "apexdsp.programs", "optimizers": "apexdsp.optimizers", "indexes": "apexdsp.indexes",
          "experiments": "apexdsp.experiments"}


def _declared_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(config["packages"])


def _packages_on_disk() -> set[str]:
    found = set()
    for init in ROOT.glob("*/**/__init__.py"):
        parts = init.parent.relative_to(ROOT).parts
        if parts[0] == "apexdsp":
            found.add(".".join(parts))
        elif parts[0] in MAPPED:
            found.add(".".join((MAPPED[parts[0]], *parts[1:])))
    return found


def test_every_package_folder_is_declared():
    assert _packages_on_disk() == _declared_packages()


def test_folders_import_under_apexdsp_namespace_and_not_at_top_level(tmp_path):
    # Run from an empty directory so that the checkout is not on sys.path.
    probe = ("import importlib, importlib.util as u; "
             "[importlib.import_module(m) for m in ('apexdsp.programs','apexdsp.optimizers','apexdsp.indexes',"
             "'apexdsp.experiments')]; "
             "print([n for n in ('programs','optimizers','indexes','experiments') if u.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "apexdsp"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in ("lm", "data", "index", "evaluate"):
        assert command in out.stdout
