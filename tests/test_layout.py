"""Project rules that hold for the whole tree: common/ imports no role, the roles import neither each other
nor the CLI, nothing unpickles or evaluates (each scan tested on samples of what it must catch), the CLI
works."""

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
# The roles that run apart, on machines of their own: they share only `common`. `iota` (the CLI and the
# devnet) composes them, so it may import them and none of them may import it.
SEPARATE_ROLES = ("orchestrator", "miner", "validator")
PRODUCT = ["common", "orchestrator", "miner", "validator", "iota"]


def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module `source` (the code of `module`) imports, anywhere in it (a lazy import in a function
    counts too), relative imports resolved to absolute names."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=module)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names.add(node.module or "")
                continue
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)] if node.level - 1 <= len(base) else []
            if node.module:
                names.add(".".join([*base, node.module]))
            else:  # `from .. import x`: x may be a module of that package
                names.update(".".join([*base, alias.name]) for alias in node.names)
    return names


def _imports_of(path: Path) -> set[str]:
    return imported_modules(path.read_text(), _module_of(path), is_package=path.name == "__init__.py")


def foreign_roles(imported: set[str], package: str) -> list[str]:
    """The modules in `imported` that `package` (a top-level folder) must not import."""
    if package == "common":
        forbidden = ROLES
    elif package in SEPARATE_ROLES:
        forbidden = ROLES - {package}
    else:
        forbidden = set()
    return sorted(m for m in imported if _root(m) in forbidden)


def _offenders(*folders: str) -> dict[str, list[str]]:
    found = {
        str(path.relative_to(ROOT)): foreign_roles(_imports_of(path), folder)
        for folder in folders
        for path in _python_files(folder)
    }
    return {k: v for k, v in found.items() if v}


def test_common_imports_no_role_package() -> None:
    assert _offenders("common") == {}


def test_roles_import_neither_each_other_nor_the_cli() -> None:
    assert _offenders(*SEPARATE_ROLES) == {}


def _crossings(module: str, source: str) -> list[str]:
    return foreign_roles(imported_modules(source, module), module.split(".")[0])


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("validator.replay", "from miner.trainer import StageTrainer, TrainerError"),
        ("validator.replay", "import miner.behaviors"),
        ("orchestrator.service", "from validator import scoring"),
        ("miner.worker", "def f() -> None:\n    from orchestrator.stage_merge import StageMerge"),
        ("miner.worker", "from iota.devnet import Devnet"),
        ("validator.daemon", "from ..orchestrator import db"),
        ("validator.daemon", "from .. import miner"),
        ("common.merge", "from orchestrator.merge_finalize import stage_shapes"),
        ("common.model.stages", "from ...iota import export"),
    ],
)
def test_the_boundary_scan_catches_each_way_to_cross_it(module: str, source: str) -> None:
    assert _crossings(module, source) != []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("validator.replay", "from common.training import StageTrainer"),
        ("validator.replay", "from . import scoring\nfrom .clasp import estimate_effects"),
        ("miner.worker", "from miner.merge_participant import MergeParticipant"),
        ("iota.devnet", "from miner.trainer import MinerTrainer\nfrom orchestrator import app"),
        ("common.model.stages", "from ..merge import flatten"),
    ],
)
def test_the_boundary_scan_leaves_allowed_imports_alone(module: str, source: str) -> None:
    assert _crossings(module, source) == []


# Modules whose loading runs code chosen by whoever wrote the bytes.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
# Everything that runs in production or on a contributor's machine; tests may craft pickles to prove that
# nothing here opens them (tests/test_codec.py).
SCANNED = [*PRODUCT, "bench", "scripts"]


def unsafe_code(source: str, where: str = "<code>") -> list[str]:
    """`where:line what` for each way `source` could run code from data: importing or calling an unpickling
    module, `eval`/`exec`, `torch.load` without `weights_only=True` (or imported bare, where it cannot be
    seen), `allow_pickle=True` (numpy), `read_pickle` (pandas) and `yaml.load`/`unsafe_load`."""
    found = []
    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.Import):
            found += [
                f"{where}:{node.lineno} import {a.name}"
                for a in node.names
                if _root(a.name) in UNSAFE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if _root(node.module) in UNSAFE_MODULES:
                found.append(f"{where}:{node.lineno} from {node.module} import")
            elif node.module == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{where}:{node.lineno} from torch import load")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            if (
                owner in UNSAFE_MODULES
                or (name in {"eval", "exec"} and owner in {"", "builtins"})  # not `model.eval()`
                or (owner == "torch" and name == "load" and not _is_true(keywords.get("weights_only")))
                or _is_true(keywords.get("allow_pickle"))
                or name == "read_pickle"
                or (owner == "yaml" and name in {"load", "load_all", "unsafe_load", "full_load"})
            ):
                found.append(f"{where}:{node.lineno} {owner + '.' if owner else ''}{name}")
    return found


def _root(module: str) -> str:
    return module.split(".")[0]


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_no_code_unpickles_or_evaluates() -> None:
    found = [
        hit
        for path in _python_files(*SCANNED)
        for hit in unsafe_code(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert found == []


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "import pickle as p",
        "from pickle import loads",
        "import dill.settings",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
        "import torch\ntorch.load('x.pt')",
        "import torch\ntorch.load('x.pt', weights_only=False)",
        "from torch import load",
        "eval('1 + 1')",
        "exec('x = 1')",
        "builtins.eval('1')",
        "marshal.loads(b'')",
        "import pandas as pd\npd.read_pickle('x.pkl')",
        "import yaml\nyaml.load(open('x'))",
    ],
)
def test_the_scan_catches_each_way_to_run_code_from_data(source: str) -> None:
    assert unsafe_code(source) != []


def test_the_scan_leaves_safe_code_alone() -> None:
    safe = """
import json
import torch
import numpy as np
model.eval()
torch.load("x.pt", weights_only=True)
np.load("x.npy")
json.load(open("x.json"))
yaml.safe_load(open("x"))
"""
    assert unsafe_code(safe) == []


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
