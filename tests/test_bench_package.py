"""bench/ is a package: every benchmark runs as `python -m bench.<name>` and, as the docs run them, as
`python bench/<name>.py` from any folder, without touching sys.path itself; and each has the `main(argv)`
that its test calls (tests/benches.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# What each benchmark does before anything else when it runs as a script (bench/_repo_root.py says why).
BOOTSTRAP = "_repo_root"


def benchmarks() -> list[Path]:
    """The modules under bench/ that run as a program (an `if __name__ == "__main__":` block)."""
    return [p for p in sorted(BENCH.glob("*.py")) if 'if __name__ == "__main__":' in p.read_text()]


def touches_sys_path(tree: ast.AST) -> bool:
    return any(
        isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
        for node in ast.walk(tree)
    )


def test_the_sys_path_scan_catches_an_insert() -> None:
    assert touches_sys_path(ast.parse("import sys\nsys.path.insert(0, '..')"))
    assert not touches_sys_path(ast.parse("import sys\nsys.exit(0)"))


def test_every_benchmark_has_main_argv_and_leaves_sys_path_to_the_bootstrap() -> None:
    names = [p.stem for p in benchmarks()]
    assert {"compression", "load", "merge", "model", "pipeline", "validation", "wire"} <= set(names), names
    for path in benchmarks():
        tree = ast.parse(path.read_text(), filename=str(path))
        assert not touches_sys_path(tree), f"{path.name} changes sys.path: import {BOOTSTRAP} instead"
        mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        assert len(mains) == 1, f"{path.name} has no main()"
        params = mains[0].args
        assert [a.arg for a in params.args] == ["argv"] and len(params.defaults) == 1, (
            f"{path.name}: main(argv: list[str] | None = None), so that a test can call it"
        )
        # The bootstrap, guarded so that `-m` and imports (which have the root already) skip it.
        guards = [
            n
            for n in tree.body
            if isinstance(n, ast.If)
            and ast.unparse(n.test) == "not __package__"
            and any(isinstance(s, ast.Import) and s.names[0].name == BOOTSTRAP for s in n.body)
        ]
        assert guards, f"{path.name} does not import {BOOTSTRAP} when run as a script"


@pytest.mark.parametrize("how", ["script", "module"])
def test_a_benchmark_that_imports_its_siblings_runs_both_ways(how: str, tmp_path: Path) -> None:
    # bench/validation.py imports bench.clasp_sim, bench.replay_sim and bench.report.
    if how == "script":  # from another folder, as a user might
        command, cwd = [sys.executable, str(BENCH / "validation.py"), "--help"], tmp_path
    else:
        command, cwd = [sys.executable, "-m", "bench.validation", "--help"], ROOT
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--quick" in done.stdout
