"""Project rules that hold for the whole tree: common/ imports no role, nothing unpickles, the CLI works."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.model import PRESETS, stage_sizes

ROOT = Path(__file__).resolve().parents[1]
ROLES = {"orchestrator", "miner", "validator", "iota"}
PRODUCT = ["common", "orchestrator", "miner", "validator", "iota"]


def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_common_imports_no_role_package() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in _imported_modules(path) if m.split(".")[0] in ROLES)
        for path in _python_files("common")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_product_code_never_unpickles_or_evaluates() -> None:
    found = []
    for path in _python_files(*PRODUCT):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            weights_only = keywords.get("weights_only")
            if (
                owner in {"pickle", "cPickle", "dill", "marshal"}
                or (name in {"eval", "exec"} and owner in {"", "builtins"})  # not `model.eval()`
                or (owner == "torch" and name == "load" and not _is_true(weights_only))
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {owner + '.' if owner else ''}{name}")
        if "import pickle" in path.read_text():
            found.append(f"{path.relative_to(ROOT)} imports pickle")
    assert found == []


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_cli_help_and_presets_json() -> None:
    iota = [sys.executable, "-m", "iota.cli"]
    help_text = subprocess.run([*iota, "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "presets" in help_text
    out = subprocess.run([*iota, "presets", "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
    rows = {row["preset"]: row for row in json.loads(out.stdout)}
    assert set(rows) == set(PRESETS)
    for name, cfg in PRESETS.items():
        assert rows[name]["stage_parameters"] == [s.parameters for s in stage_sizes(cfg)]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("role", ["miner", "validator", "orchestrator"])
def test_pm2_files_are_javascript_that_starts_the_role(role: str) -> None:
    script = (
        f"const c = require('./pm2/{role}.config.js');"
        "console.log(JSON.stringify(c.apps.map(a => ({name: a.name, script: a.script}))));"
    )
    out = subprocess.run(["node", "-e", script], cwd=ROOT, capture_output=True, text=True, check=True)
    apps = json.loads(out.stdout)
    assert [a["name"] for a in apps] == [f"iota-{role}"]
    assert Path(apps[0]["script"]) == ROOT / f"start_{role}.sh"
    assert (ROOT / f"start_{role}.sh").stat().st_mode & 0o111
