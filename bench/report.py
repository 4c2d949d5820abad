"""How every benchmark hands out its result: JSON to a file always, then JSON or a table on stdout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def emit(
    result: dict[str, Any], out: Path, *, as_json: bool, print_table: Callable[[dict[str, Any]], None]
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
        print(f"wrote {out}")
