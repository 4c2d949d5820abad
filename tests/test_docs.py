"""The docs cannot rot.

- docs/protocol.md's reference is what `scripts/protocol_doc.py` generates from the code today;
- every internal link in README.md and docs/*.md points at a file that exists (and at a heading, if it names
  one);
- every command in a shell block of those files (```bash, ```sh, ```console, and command-looking lines in
  plain ``` blocks) is run here, run by a named test elsewhere, or excused with a reason: a new command in
  the docs that is none of these fails the test, with what to do about it;
- the PM2 process files load in node and describe the app the docs promise;
- the backup and restore commands of docs/orchestrator.md work on a live, WAL-mode orchestrator database;
- docs/miner.md's table of stage sizes matches the model code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.timeout(300)

SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
# Plain ``` blocks hold diagrams and formulas too; in them only lines that start like a command count.
_COMMAND_START = re.compile(
    r"(\./|\.venv/bin/|[A-Z][A-Z0-9_]*=\S* |"
    r"(python3?|iota|pm2|node|sqlite3|btcli|curl|pip|bash|cp|rm|git|nvidia-smi|tail)(\s|$))"
)


@dataclass(frozen=True)
class Command:
    text: str
    where: str  # "docs/miner.md:42"


def _strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a `#` outside quotes, at the start or after a space)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _fences(path: Path) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of every fenced block."""
    blocks: list[tuple[str, int, list[str]]] = []
    current: tuple[str, int, list[str]] | None = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            if current is None:
                current = (line.strip()[3:].strip().lower(), number + 1, [])
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current[2].append(line)
    return blocks


def doc_commands() -> list[Command]:
    commands: list[Command] = []
    for path in DOCS:
        where_file = path.relative_to(ROOT).as_posix()
        for lang, first, lines in _fences(path):
            if lang not in SHELL_LANGS and lang != "":
                continue
            pending, start = "", 0
            for offset, raw in enumerate(lines):
                line = raw.strip()
                if lang == "console":
                    if not line.startswith("$ ") and not pending:
                        continue  # output, not a command
                    line = line.removeprefix("$ ")
                if not pending:
                    start = first + offset
                if line.endswith("\\"):
                    pending += line[:-1] + " "
                    continue
                text = " ".join(_strip_comment(pending + line).split())
                pending = ""
                if not text or (lang == "" and not _COMMAND_START.match(text)):
                    continue
                commands.append(Command(text, f"{where_file}:{start}"))
    return commands


# ---------------------------------------------------------------------------------------------------------
# What becomes of each command. A command is matched (whole) against these in order: RUN, COVERED, EXCUSED.

# Run by this file, from the repository root with .venv/bin first on PATH; each must exit 0.
RUN = [
    r"iota --help",
    r"iota presets( [\w.]+)?",
    r"iota check --help",
    r"\./setup\.sh --help",
]

# Run by another test, which must exist.
COVERED = [
    (r"python scripts/protocol_doc\.py( --check)?", "tests/test_docs.py"),
    (r"sqlite3 .*", "tests/test_docs.py"),
    (r"cp orchestrator-backup\.sqlite \S+", "tests/test_docs.py"),
    (r"rm -f \S+-wal \S+-shm", "tests/test_docs.py"),
    (r"\./test\.sh( .*)?", ".ci/run"),
    # test.sh runs setup.sh (dev role, torch detected) in every CI run.
    (r"\./setup\.sh( --cpu)?", ".ci/run"),
    (r"iota devnet --validators \d+ --adversaries .*", "tests/test_validation_e2e.py"),
    # nanio as NanioS3 starts it, and a devnet on it as `Devnet` with an external store.
    (r"NANIO_ACCESS_KEY=\S+ NANIO_SECRET_KEY=\S+ nanio serve .*", "tests/test_s3_verify.py"),
    (r"iota devnet --s3-endpoint \S+", "tests/test_s3_verify.py"),
    (r"\./devnet\.sh( .*)?", "tests/test_operating_e2e.py"),
    # Started, SIGKILLed and restarted by PM2, and stopped, for the miner and the validator.
    (r"pm2 (start pm2/(miner|validator)\.config\.js|stop iota-(miner|validator))", "tests/test_pm2_e2e.py"),
    (r"python bench/s3_servers\.py( .*)?", "tests/test_bench_s3_servers.py"),
    # Each start script against missing prerequisites, with the checks skipped, and the miner's check passing.
    (r"(IOTA_\w+=\S+ )*\./start_(miner|validator|orchestrator)\.sh", "tests/test_start_scripts.py"),
    (r"iota check (miner|validator|orchestrator)", "tests/test_start_scripts.py"),
    (r"iota (export|sample) .*", "tests/test_export.py"),
    (r"python bench/pipeline\.py( .*)?", "tests/test_bench_pipeline.py"),
    (r"python bench/merge\.py( .*)?", "tests/test_bench_merge.py"),
    (r"python bench/validation\.py( .*)?", "tests/test_bench_validation.py"),
    (r"python bench/replay_sim\.py( .*)?", "tests/test_replay.py"),
    (r"python bench/compression\.py( .*)?", "tests/test_bench_compression.py"),
    (r"python bench/load\.py( .*)?", "tests/test_bench_load.py"),
    # The dry run end to end, and the real run's refusal without CUDA.
    (r"\./scripts/gpu_check\.sh( .*)?", "tests/test_gpu_check.py"),
]

_CHAIN = "needs the real Bittensor chain (and TAO), or creates keys in ~/.bittensor"
_RUNNING = "talks to a running daemon"
EXCUSED = [
    (
        r"\./setup\.sh --role \w+( --\w+)*( && \./start_\w+\.sh)?",
        "installs packages for minutes and writes .env; the dev role runs in every CI run",
    ),
    (
        r"pm2 (logs|save|start iota-\w+|start pm2/orchestrator\.config\.js|stop iota-orchestrator) ?.*",
        "controls daemons under PM2 (the orchestrator's process file is the miner's and the validator's, "
        "which tests/test_pm2_e2e.py starts, restarts and stops, with another role)",
    ),
    (r"btcli .*", _CHAIN),
    (r"curl .*", _RUNNING),
    (
        r"python bench/stage_memory\.py .*",
        "a benchmark of the 1.5b stages: needs about 11 GiB of memory, or a "
        "GPU; its figures are in docs/benchmarks.md",
    ),
    (
        r"python bench/(wire|clasp_sim)\.py( .*)?",
        "a benchmark run of minutes; its figures are in docs/benchmarks.md",
    ),
]


def classify(command: str) -> tuple[str, str]:
    """("run", pattern), ("covered", test file) or ("excused", reason); ("", "") when none matches."""
    for pattern in RUN:
        if re.fullmatch(pattern, command):
            return "run", pattern
    for pattern, target in COVERED:
        if re.fullmatch(pattern, command):
            return "covered", target
    for pattern, reason in EXCUSED:
        if re.fullmatch(pattern, command):
            return "excused", reason
    return "", ""


COMMANDS = doc_commands()
RUN_COMMANDS = sorted({c.text for c in COMMANDS if classify(c.text)[0] == "run"})


def test_every_doc_command_is_run_covered_or_excused() -> None:
    assert len(COMMANDS) >= 20, "the command scan found almost nothing: is the fence parsing broken?"
    unaccounted = [c for c in COMMANDS if not classify(c.text)[0]]
    assert not unaccounted, "\n".join(
        [
            "these commands in the docs are neither run by a test nor excused:",
            *(f"  {c.where}: {c.text}" for c in unaccounted),
            "Add each to a table in tests/test_docs.py: RUN (fast, run here), COVERED (the test that runs "
            "it), or EXCUSED (why no test can run it).",
        ]
    )
    for _, target in COVERED:
        assert (ROOT / target).is_file(), f"tests/test_docs.py says {target} runs a docs command; it is gone"


def test_every_table_entry_is_still_used() -> None:
    """A pattern no command matches any more is a promise nobody checks: remove it."""
    used = Counter(
        pattern
        for c in COMMANDS
        for pattern in [*RUN, *(p for p, _ in COVERED), *(p for p, _ in EXCUSED)]
        if re.fullmatch(pattern, c.text)
    )
    stale = [p for p in [*RUN, *(p for p, _ in COVERED), *(p for p, _ in EXCUSED)] if not used[p]]
    assert not stale, f"no command in the docs matches these patterns of tests/test_docs.py: {stale}"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTA_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="120")
    return env


@pytest.fixture(scope="module")
def run_results() -> dict[str, subprocess.CompletedProcess[str]]:
    """Every RUN command's result; two at a time, since each `iota` start is mostly importing torch."""

    def run(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", command], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(RUN_COMMANDS, pool.map(run, RUN_COMMANDS), strict=True))


@pytest.mark.parametrize("command", RUN_COMMANDS)
def test_doc_command_runs(command: str, run_results: dict[str, subprocess.CompletedProcess[str]]) -> None:
    done = run_results[command]
    output = f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
    assert done.returncode == 0, (
        f"`{command}` (run from the repository root) exited {done.returncode}:\n{output}"
    )
    assert done.stdout.strip(), f"`{command}` printed nothing"


# ---------------------------------------------------------------------------------------------------------
# protocol.md


def test_protocol_doc_is_current() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/protocol_doc.py", "--check"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, (
        f"docs/protocol.md does not match the code; run `python scripts/protocol_doc.py`:\n"
        f"{done.stdout[-6000:]}{done.stderr[-3000:]}"
    )


# ---------------------------------------------------------------------------------------------------------
# Links

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_INLINE_CODE = re.compile(r"`[^`]*`")


def _prose(path: Path) -> list[tuple[int, str]]:
    """Numbered lines outside fenced blocks, without inline code."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, _INLINE_CODE.sub("", line)))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: Counter[str] = Counter()
    found = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*)", line)):
            base = slug(m.group(1))
            found.add(base if not seen[base] else f"{base}-{seen[base]}")
            seen[base] += 1
    return found


def test_internal_links_resolve() -> None:
    broken = []
    checked = 0
    for path in DOCS:
        for number, line in _prose(path):
            for target in _LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                linked = (path.parent / file_part).resolve() if file_part else path
                where = f"{path.relative_to(ROOT)}:{number}: {target}"
                checked += 1
                if not linked.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                    broken.append(f"{where} (no heading with that anchor)")
    assert checked > 50, "the link scan found almost nothing: is the pattern broken?"
    assert not broken, "broken links:\n" + "\n".join(broken)


# ---------------------------------------------------------------------------------------------------------
# PM2 process files


def test_pm2_process_files() -> None:
    node = shutil.which("node")
    assert node, "node is needed to check the PM2 process files (it ships with the machine image)"
    files = sorted((ROOT / "pm2").glob("*.config.js"))
    assert {f.name for f in files} == {"miner.config.js", "validator.config.js", "orchestrator.config.js"}
    # Without IOTA_PM2_LOG_DIR, the logs go where the docs say (tests/test_pm2_e2e.py sets it to a temp dir).
    env = {k: v for k, v in os.environ.items() if k != "IOTA_PM2_LOG_DIR"}
    for file in files:
        role = file.name.removesuffix(".config.js")
        done = subprocess.run(
            [node, "-e", "process.stdout.write(JSON.stringify(require(process.argv[1])))", str(file)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert done.returncode == 0, f"node cannot load {file}: {done.stderr}"
        apps = json.loads(done.stdout)["apps"]
        assert len(apps) == 1, f"{file}: expected one app, got {len(apps)}"
        app = apps[0]
        assert app["name"] == f"iota-{role}"
        assert Path(app["script"]) == ROOT / f"start_{role}.sh" and Path(app["script"]).is_file()
        assert os.access(app["script"], os.X_OK), f"{app['script']} is not executable"
        assert Path(app["cwd"]) == ROOT
        assert app["interpreter"] == "bash"
        assert app["autorestart"] is True
        for key in ("out_file", "error_file"):
            assert Path(app[key]).parent == ROOT / "logs", f"{file}: {key} is {app[key]}, not under logs/"
            assert Path(app[key]).name.startswith(role)


# ---------------------------------------------------------------------------------------------------------
# Backups (docs/orchestrator.md)


def test_backup_and_restore_commands_work_on_a_live_database(tmp_path: Path) -> None:
    """The documented backup of a running orchestrator's WAL database holds its latest commit, and the
    documented restore brings it back."""
    from orchestrator.db import StateDB

    commands = [c.text for c in COMMANDS if c.where.startswith("docs/orchestrator.md:")]
    backup = [c for c in commands if c.startswith("sqlite3 ")]
    restore = [c for c in commands if re.match(r"(cp|rm) ", c)]
    assert len(backup) == 2 and len(restore) == 2, (backup, restore)
    state = tmp_path / ".iota" / "orchestrator.sqlite"
    state.parent.mkdir()
    db = StateDB(state)  # left open, as by a running orchestrator
    with db.transaction():
        db.set_meta("run_id", "run-backed-up")
    wal = state.with_name(state.name + "-wal")
    assert wal.stat().st_size > 0, "the commit should still be in the WAL for this test to mean anything"
    for command in backup:
        done = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"`{command}`: {done.stderr}"
    assert "ok" in done.stdout  # the integrity check
    with db.transaction():  # the run goes on after the backup...
        db.set_meta("run_id", "run-after-the-backup")
    db.close()  # ...until the operator stops it to restore
    for command in restore:
        done = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"`{command}`: {done.stderr}"
    restored = StateDB(state)
    try:
        assert restored.get_meta("run_id") == "run-backed-up"
    finally:
        restored.close()


# ---------------------------------------------------------------------------------------------------------
# docs/miner.md's hardware table

_SIZE_ROW = re.compile(
    r"\| `(?P<preset>[\w.]+)` \| (?P<stages>[^|]+) \| (?P<roles>[^|]+) \| (?P<params>[\d,]+) \| "
    r"(?P<gib>[\d.]+) GiB \|"
)


def _stages(text: str) -> list[int]:
    stages: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition(" to ")
        stages.extend(range(int(first), int(last or first) + 1))
    return stages


def test_miner_hardware_table_matches_the_model() -> None:
    from common.model import PRESETS, get_preset, stage_sizes
    from iota.preflight import WEIGHT_AND_GRAD_BYTES_PER_PARAM, stage_optimizer_bytes

    rows = [
        m for line in (ROOT / "docs" / "miner.md").read_text().splitlines() if (m := _SIZE_ROW.match(line))
    ]
    listed: dict[str, list[int]] = {}
    for row in rows:
        sizes = stage_sizes(get_preset(row["preset"]))
        params = int(row["params"].replace(",", ""))
        for stage in _stages(row["stages"]):
            assert sizes[stage].parameters == params, (
                f"{row['preset']} stage {stage}: {sizes[stage].parameters}"
            )
            assert sizes[stage].role in row["roles"], (
                f"{row['preset']} stage {stage} is a {sizes[stage].role}"
            )
            listed.setdefault(row["preset"], []).append(stage)
        # Weights, gradients and the optimizer's state, as the preset's vocab_optimizer makes it.
        cfg = get_preset(row["preset"])
        states = params * WEIGHT_AND_GRAD_BYTES_PER_PARAM + stage_optimizer_bytes(cfg, sizes[stage])
        assert f"{states / 2**30:.2f}" == row["gib"], row.group(0)
    for preset in PRESETS:
        n_stages = len(stage_sizes(get_preset(preset)))
        assert sorted(listed.get(preset, [])) == list(range(n_stages)), f"{preset}: every stage, once"
