"""docs/architecture.md's data path names real code: every function in its table is defined in a file of
the same row (a `Class.method` as a method of that class), so a rename that forgets the doc fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
_NAME = re.compile(r"`([^`]+)`")


def data_path_rows() -> list[tuple[list[str], list[str]]]:
    """(names, files) of every row of the data-path table."""
    text = DOC.read_text()
    section = text.split("## Data path", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            rows.append((_NAME.findall(cells[2]), _NAME.findall(cells[3])))
    return rows


def definitions(path: Path) -> set[str]:
    """Module-level functions and classes, and `Class.method` for each method."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    names.add(f"{node.name}.{item.name}")
    return names


def test_the_data_path_table_has_every_hop() -> None:
    rows = data_path_rows()
    assert len(rows) >= 25, rows
    assert all(names and files for names, files in rows), rows


def test_every_function_of_the_data_path_exists_in_its_file() -> None:
    missing = []
    for names, files in data_path_rows():
        defined = set().union(*(definitions(ROOT / f) for f in files))
        missing += [(name, files) for name in names if name not in defined]
    assert not missing, f"docs/architecture.md's data path names code that is not there: {missing}"


def test_the_check_would_catch_a_missing_name(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("class A:\n    def b(self) -> None: ...\n\ndef c() -> None: ...\n")
    assert definitions(module) == {"A", "A.b", "c"}
