"""The layer contract (pyproject.toml, [tool.importlinter]): packages import downward only and
the modules of a package form no import cycle. CI runs `lint-imports` too; these tests also show
that the contract can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# bottom to top: each may import only from those before it (samplers and metrics side by side)
LAYERS = ["sde_lib", "data", "models", "likelihood", "samplers", "metrics", "training", "tasks"]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    code = (
        "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def copy_tree(dest: Path) -> None:
    for pkg in LAYERS:
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")


def test_the_contract_holds_and_breaks_on_an_upward_import_or_a_cycle(tmp_path):
    ok = lint_imports(ROOT)
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert "2 kept, 0 broken" in ok.stdout
    upward = tmp_path / "upward"
    copy_tree(upward)
    with open(upward / "samplers" / "api.py", "a") as f:
        f.write("\nfrom tasks.common import load_score_model  # noqa: E402,F401\n")
    bad = lint_imports(upward)
    assert bad.returncode != 0
    assert "samplers.api -> tasks.common" in bad.stdout, bad.stdout[-3000:]
    cycle = tmp_path / "cycle"
    copy_tree(cycle)
    with open(cycle / "samplers" / "grids.py", "a") as f:  # api imports grids (via the samplers)
        f.write("\nfrom . import api  # noqa: E402,F401\n")
    bad = lint_imports(cycle)
    assert bad.returncode != 0 and "No cycles are allowed in samplers" in bad.stdout, bad.stdout


@pytest.mark.parametrize("package", LAYERS)
def test_importing_a_package_loads_no_layer_above_it(package):
    above = LAYERS[LAYERS.index(package) + 1 :]
    if package == "samplers":
        above.remove("metrics")  # side by side: neither may import the other
    code = (
        f"import sys, {package}; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({above!r})))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", f"import {package} loaded {r.stdout.strip()}"
