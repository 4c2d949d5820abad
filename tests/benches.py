"""The one way a test runs a benchmark: `bench.<name>.main(argv)` in this process, as
`python -m bench.<name> *argv` would run it (torch is already imported here, where a subprocess would
spend seconds importing it again), with the process left as it was."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import pytest
import torch


def run_bench(bench: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """What `bench.main(argv)` prints, parsed: pass `--json`. Torch's thread count (benchmarks pin their
    own) and the global generator (some seed it) are restored for the rest of the session."""
    capsys.readouterr()  # only the benchmark's own output
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result
