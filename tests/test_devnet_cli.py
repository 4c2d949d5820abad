"""`iota devnet` with stdout not a terminal (a log file, CI, nohup) prints its status line at a steady
interval, not only the final summary."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STATUS = re.compile(
    r"^\[\s*(\d+) s\] samples \d+ done, \d+ in flight, \d+ dropped \| [\d,]+ tokens/s \| loss (-|\d+\.\d{3}) "
    r"\| epoch \d+ \((training|draining|merging)\), \d+ stage merges$"
)


@pytest.mark.slow
def test_devnet_prints_status_lines_to_a_pipe(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTA_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # Training runs 6 s after the miners join, with a line every 2 s: lines at about 0, 2 and 4 s.
    command = [
        str(REPO / ".venv/bin/iota"),
        "devnet",
        *("--stages", "2", "--batch-size", "2", "--seq-len", "32", "--merge-every", "0", "--validators", "0"),
        *("--duration", "6", "--status-interval", "2"),
        *("--workdir", str(tmp_path / "net"), "--summary", str(tmp_path / "summary.json")),
    ]
    done = subprocess.run(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    elapsed = [int(m.group(1)) for m in map(STATUS.match, lines) if m]
    assert len(elapsed) >= 2, done.stdout
    assert elapsed == sorted(elapsed) and elapsed[-1] >= elapsed[0] + 2, done.stdout
    assert not any("\x1b[" in line for line in lines), "terminal escapes in a pipe's output"
    assert lines[0].startswith("iota devnet: preset tiny") and lines[0].endswith("validators..."), lines[0]
    summary = [line for line in lines if line.startswith("done: ")]
    assert len(summary) == 1 and f"Summary: {tmp_path / 'summary.json'}" in summary[0], done.stdout
    # The status lines come before the summary, each whole on its own line (rich would wrap at 80 columns).
    assert lines.index(summary[0]) > max(i for i, line in enumerate(lines) if STATUS.match(line))
