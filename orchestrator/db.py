"""The orchestrator's durable state: one SQLite file in WAL mode.

The scheduler keeps its hot state in memory and writes every transition through here, so that a killed
and restarted orchestrator reloads the same run: its miners, the samples in flight and their items, the
loss log and the counters. Rows are plain columns plus JSON for small nested values; nothing is pickled.
The schema is deliberately portable SQL, so that the same model can move to PostgreSQL.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from common.protocol import ArtifactRef, ItemKind

ItemStatus = Literal["queued", "assigned", "done", "failed"]
SampleState = Literal["in_flight", "retry", "done", "dropped"]

SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS miners (
    hotkey TEXT PRIMARY KEY, session INTEGER NOT NULL, stage INTEGER NOT NULL, device TEXT NOT NULL,
    registered_at REAL NOT NULL, last_seen REAL NOT NULL, active INTEGER NOT NULL,
    items_completed INTEGER NOT NULL, forward_s REAL, backward_s REAL, move_to INTEGER,
    epoch_steps INTEGER NOT NULL, weights_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    sample INTEGER PRIMARY KEY, state TEXT NOT NULL, attempts INTEGER NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY, sample INTEGER NOT NULL, attempt INTEGER NOT NULL, stage INTEGER NOT NULL,
    kind TEXT NOT NULL, status TEXT NOT NULL, miner TEXT, session INTEGER, forward_item TEXT,
    input TEXT, output_key TEXT, output TEXT,
    created_at REAL NOT NULL, assigned_at REAL, deadline REAL NOT NULL, completed_at REAL,
    epoch INTEGER, done_seq INTEGER, loss REAL
);
CREATE INDEX IF NOT EXISTS items_by_attempt ON items (sample, attempt);
CREATE INDEX IF NOT EXISTS items_by_epoch ON items (epoch, miner);
CREATE TABLE IF NOT EXISTS losses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, sample INTEGER NOT NULL, attempt INTEGER NOT NULL,
    loss REAL NOT NULL, at REAL NOT NULL, pathway TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL,
    sample INTEGER, attempt INTEGER, miner TEXT, detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS garbage (key TEXT PRIMARY KEY, not_before REAL NOT NULL);
CREATE TABLE IF NOT EXISTS merges (
    epoch INTEGER NOT NULL, stage INTEGER NOT NULL, record TEXT NOT NULL, PRIMARY KEY (epoch, stage)
);
CREATE TABLE IF NOT EXISTS validations (
    task_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, stage INTEGER NOT NULL, miner TEXT NOT NULL,
    status TEXT NOT NULL, created_at REAL NOT NULL, validator TEXT, lease_deadline REAL,
    verdict TEXT, verdict_at REAL, task TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS validations_by_epoch ON validations (epoch);
"""


@dataclass
class Item:
    """One hop of one attempt of one sample at one stage."""

    item_id: str
    sample: int
    attempt: int
    stage: int
    kind: ItemKind
    status: ItemStatus
    created_at: float
    deadline: float
    miner: str | None = None  # for backward items: set when queued (the forward's miner)
    session: int | None = None
    forward_item: str | None = None
    input: ArtifactRef | None = None
    output_key: str | None = None
    output: ArtifactRef | None = None
    assigned_at: float | None = None
    completed_at: float | None = None
    # Set when the item is accepted: the epoch it belongs to, its place in the order of all accepted items
    # (which is each miner's order of work, and so of its optimizer steps), and the tail's reported loss.
    epoch: int | None = None
    done_seq: int | None = None
    loss: float | None = None


@dataclass
class Miner:
    hotkey: str
    session: int
    stage: int
    device: str
    registered_at: float
    last_seen: float
    active: bool = True
    items_completed: int = 0
    forward_s: float | None = None  # EWMA of seconds from hand-out to completion
    backward_s: float | None = None
    move_to: int | None = None
    epoch_steps: int = 0  # optimizer steps accepted from it this epoch (its merge weight)
    weights_version: int = 0  # the global weights version it holds, as far as the orchestrator knows
    # In memory only, rebuilt on load from the items table:
    holding: set[str] = field(default_factory=set)  # forward items whose autograd state it keeps
    cancelled: list[str] = field(default_factory=list)


@dataclass
class Sample:
    sample: int
    state: SampleState
    attempts: int


# Row columns are the dataclass fields (minus the in-memory ones), so each mapping is written once.
_ITEM_FIELDS = tuple(f.name for f in fields(Item))
_MINER_FIELDS = tuple(f.name for f in fields(Miner) if f.name not in ("holding", "cancelled"))
_ITEM_COLUMNS = ", ".join(_ITEM_FIELDS)
_MINER_COLUMNS = ", ".join(_MINER_FIELDS)
_ARTIFACT_FIELDS = ("input", "output")


def _marks(columns: tuple[str, ...]) -> str:
    return ",".join("?" * len(columns))


def _typed(value: str, allowed: Any, column: str) -> Any:
    """A TEXT column read back as its Literal type; a value outside it means a corrupt or foreign file."""
    if value not in get_args(allowed):
        raise ValueError(f"{column} {value!r} is not one of {get_args(allowed)}")
    return value


def _item(row: tuple[Any, ...]) -> Item:
    values = dict(zip(_ITEM_FIELDS, row, strict=True))
    for name in _ARTIFACT_FIELDS:
        values[name] = _ref(values[name])
    values["kind"] = _typed(values["kind"], ItemKind, "items.kind")
    values["status"] = _typed(values["status"], ItemStatus, "items.status")
    return Item(**values)


def _item_row(it: Item) -> tuple[Any, ...]:
    return tuple(
        _ref_json(getattr(it, name)) if name in _ARTIFACT_FIELDS else getattr(it, name)
        for name in _ITEM_FIELDS
    )


def _ref_json(ref: ArtifactRef | None) -> str | None:
    return None if ref is None else ref.model_dump_json()


def _ref(text: str | None) -> ArtifactRef | None:
    return None if text is None else ArtifactRef.model_validate_json(text)


class StateDB:
    """Row-level persistence for the scheduler. Every write commits before the caller answers a request."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # The event loop owns the connection; uvicorn may run the app's lifespan in another thread.
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across process crashes in WAL mode (only an OS crash can lose the last commits).
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self._depth = 0

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes into one commit; nests (only the outermost commits)."""
        if self._depth == 0:
            self._conn.execute("BEGIN")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self._conn.execute("ROLLBACK")
            raise
        self._depth -= 1
        if self._depth == 0:
            self._conn.execute("COMMIT")

    # -- meta -------------------------------------------------------------------------------------------

    def get_meta(self, key: str) -> Any | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        self._conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )

    # -- miners -----------------------------------------------------------------------------------------

    def save_miner(self, m: Miner) -> None:
        self._conn.execute(
            f"INSERT OR REPLACE INTO miners ({_MINER_COLUMNS}) VALUES ({_marks(_MINER_FIELDS)})",
            tuple(getattr(m, name) for name in _MINER_FIELDS),
        )

    def load_miners(self) -> list[Miner]:
        rows = self._conn.execute(f"SELECT {_MINER_COLUMNS} FROM miners").fetchall()
        miners = [Miner(**dict(zip(_MINER_FIELDS, row, strict=True))) for row in rows]
        for miner in miners:
            miner.active = bool(miner.active)  # SQLite stores it as 0/1
        return miners

    # -- samples ----------------------------------------------------------------------------------------

    def save_sample(self, s: Sample, now: float) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO samples (sample, state, attempts, updated_at) VALUES (?,?,?,?)",
            (s.sample, s.state, s.attempts, now),
        )

    def load_samples(self, states: tuple[SampleState, ...]) -> list[Sample]:
        marks = ",".join("?" * len(states))
        rows = self._conn.execute(
            f"SELECT sample, state, attempts FROM samples WHERE state IN ({marks}) ORDER BY sample", states
        ).fetchall()
        return [
            Sample(sample=r[0], state=_typed(r[1], SampleState, "samples.state"), attempts=r[2]) for r in rows
        ]

    def count_samples(self) -> dict[str, int]:
        rows = self._conn.execute("SELECT state, COUNT(*) FROM samples GROUP BY state").fetchall()
        return {state: n for state, n in rows}

    # -- items ------------------------------------------------------------------------------------------

    def save_item(self, it: Item) -> None:
        self._conn.execute(
            f"INSERT OR REPLACE INTO items ({_ITEM_COLUMNS}) VALUES ({_marks(_ITEM_FIELDS)})", _item_row(it)
        )

    def load_items(self, sample: int, attempt: int) -> list[Item]:
        rows = self._conn.execute(
            f"SELECT {_ITEM_COLUMNS} FROM items WHERE sample = ? AND attempt = ?", (sample, attempt)
        ).fetchall()
        return [_item(r) for r in rows]

    def get_item(self, item_id: str) -> Item | None:
        row = self._conn.execute(
            f"SELECT {_ITEM_COLUMNS} FROM items WHERE item_id = ?", (item_id,)
        ).fetchone()
        return None if row is None else _item(row)

    def done_items(self, miner: str, epoch: int, stage: int) -> list[Item]:
        """The items `miner` completed at `stage` during `epoch`, in the order it completed them."""
        rows = self._conn.execute(
            f"SELECT {_ITEM_COLUMNS} FROM items WHERE epoch = ? AND miner = ? AND stage = ? "
            "AND done_seq IS NOT NULL ORDER BY done_seq",
            (epoch, miner, stage),
        ).fetchall()
        return [_item(r) for r in rows]

    def items_per_miner(self, epoch: int) -> dict[tuple[str, int], int]:
        """(miner, stage) -> items accepted in `epoch`."""
        rows = self._conn.execute(
            "SELECT miner, stage, COUNT(*) FROM items WHERE epoch = ? AND done_seq IS NOT NULL "
            "GROUP BY miner, stage",
            (epoch,),
        ).fetchall()
        return {(r[0], r[1]): r[2] for r in rows}

    def count_items(self, status: ItemStatus) -> int:
        row = self._conn.execute("SELECT COUNT(*) FROM items WHERE status = ?", (status,)).fetchone()
        return int(row[0])

    # -- losses and events ------------------------------------------------------------------------------

    def add_loss(self, sample: int, attempt: int, loss: float, at: float, pathway: list[str]) -> int:
        cur = self._conn.execute(
            "INSERT INTO losses (sample, attempt, loss, at, pathway) VALUES (?,?,?,?,?)",
            (sample, attempt, loss, at, json.dumps(pathway)),
        )
        return int(cur.lastrowid or 0)

    def losses_after(self, after: int, limit: int) -> list[tuple[int, int, int, float, float, list[str]]]:
        rows = self._conn.execute(
            "SELECT seq, sample, attempt, loss, at, pathway FROM losses WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        ).fetchall()
        return [(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]

    def add_event(
        self,
        at: float,
        kind: str,
        detail: str,
        *,
        sample: int | None = None,
        attempt: int | None = None,
        miner: str | None = None,
    ) -> None:
        self._conn.execute(
            "INSERT INTO events (at, kind, sample, attempt, miner, detail) VALUES (?,?,?,?,?,?)",
            (at, kind, sample, attempt, miner, detail),
        )

    def count_events(self, kind: str) -> int:
        row = self._conn.execute("SELECT COUNT(*) FROM events WHERE kind = ?", (kind,)).fetchone()
        return int(row[0])

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT seq, at, kind, sample, attempt, miner, detail FROM events"
        rows = self._conn.execute(
            sql + (" WHERE kind = ?" if kind else "") + " ORDER BY seq", (kind,) if kind else ()
        ).fetchall()
        names = ("seq", "at", "kind", "sample", "attempt", "miner", "detail")
        return [dict(zip(names, r, strict=True)) for r in rows]

    # -- garbage ----------------------------------------------------------------------------------------

    def add_garbage(self, keys: list[str], not_before: float) -> None:
        self._conn.executemany(
            "INSERT OR IGNORE INTO garbage (key, not_before) VALUES (?, ?)", [(k, not_before) for k in keys]
        )

    def due_garbage(self, now: float, limit: int = 1000) -> list[str]:
        rows = self._conn.execute(
            "SELECT key FROM garbage WHERE not_before <= ? LIMIT ?", (now, limit)
        ).fetchall()
        return [r[0] for r in rows]

    def remove_garbage(self, keys: list[str]) -> None:
        self._conn.executemany("DELETE FROM garbage WHERE key = ?", [(k,) for k in keys])

    def count_garbage(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM garbage").fetchone()[0])

    # -- merges -----------------------------------------------------------------------------------------

    def add_merge(self, epoch: int, stage: int, record: str) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO merges (epoch, stage, record) VALUES (?, ?, ?)", (epoch, stage, record)
        )

    def merges_after(self, epoch: int, limit: int) -> list[str]:
        """Merge records (JSON) of epochs from `epoch` on, oldest first."""
        rows = self._conn.execute(
            "SELECT record FROM merges WHERE epoch >= ? ORDER BY epoch, stage LIMIT ?", (epoch, limit)
        ).fetchall()
        return [r[0] for r in rows]

    def merges_of(self, epoch: int) -> list[str]:
        rows = self._conn.execute("SELECT record FROM merges WHERE epoch = ? ORDER BY stage", (epoch,))
        return [r[0] for r in rows.fetchall()]

    # -- validations ------------------------------------------------------------------------------------

    def add_validation(self, task_id: str, epoch: int, stage: int, miner: str, at: float, task: str) -> None:
        self._conn.execute(
            "INSERT INTO validations (task_id, epoch, stage, miner, status, created_at, task) "
            "VALUES (?,?,?,?,'queued',?,?)",
            (task_id, epoch, stage, miner, at, task),
        )

    def save_validation(self, v: dict[str, Any]) -> None:
        self._conn.execute(
            "UPDATE validations SET status = ?, validator = ?, lease_deadline = ?, verdict = ?, "
            "verdict_at = ? WHERE task_id = ?",
            (v["status"], v["validator"], v["lease_deadline"], v["verdict"], v["verdict_at"], v["task_id"]),
        )

    def validations(
        self, *, statuses: tuple[str, ...] = (), epoch: int | None = None
    ) -> list[dict[str, Any]]:
        names = (
            "task_id", "epoch", "stage", "miner", "status", "created_at", "validator", "lease_deadline",
            "verdict", "verdict_at", "task",
        )  # fmt: skip
        sql, args = f"SELECT {', '.join(names)} FROM validations WHERE 1=1", []
        if statuses:
            sql += f" AND status IN ({','.join('?' * len(statuses))})"
            args += list(statuses)
        if epoch is not None:
            sql += " AND epoch = ?"
            args.append(epoch)
        rows = self._conn.execute(sql + " ORDER BY created_at, task_id", args).fetchall()
        return [dict(zip(names, r, strict=True)) for r in rows]

    def count_validations(self) -> dict[str, int]:
        rows = self._conn.execute("SELECT status, COUNT(*) FROM validations GROUP BY status").fetchall()
        return {status: n for status, n in rows}

    def count_merges(self, outcome: str) -> int:
        row = self._conn.execute(
            "SELECT COUNT(*) FROM merges WHERE json_extract(record, '$.outcome') = ?", (outcome,)
        ).fetchone()
        return int(row[0])
