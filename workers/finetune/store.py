"""The fine-tune worker's example store: every training example the stream gave it, durable, bounded, and the
consumer positions that produced them — in one SQLite file, written in one transaction.

Why one transaction: an example and the offset after the message it came from are committed together (and
fsynced: `synchronous=FULL`), so a restart resumes from the stored positions and neither loses nor repeats an
example, whatever Kafka's committed offsets say (they are committed too, after the store, for lag reporting).

One connection, shared by the consuming loop and the training thread under a lock.

Bounded: beyond `max_examples`, the oldest examples are evicted — except a reservoir of `replay_size` kept at
random (reservoir sampling over every evicted example), so a cycle can mix old data into its batches
against forgetting. Per user, the store keeps the last `history_size` items (clicks build next-item
examples from them, the way offline training uses a history prefix).
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: ExampleStore, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,                -- "feedback" or "clicks"
    ts REAL NOT NULL,                    -- when the user chose the target (event time)
    user_id TEXT NOT NULL,
    body TEXT NOT NULL,                  -- the Example as JSON
    replay INTEGER NOT NULL DEFAULT 0    -- 1: kept from eviction for replay
);
CREATE INDEX IF NOT EXISTS examples_ts ON examples (ts);
CREATE TABLE IF NOT EXISTS positions (topic TEXT, partition INTEGER, next_offset INTEGER, PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS histories (user_id TEXT PRIMARY KEY, items TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS cycles (
    id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL, finished REAL, trained_to INTEGER, verdict TEXT
);
"""


@dataclass(frozen=True)
class Example:
    """One training example from the stream: the user's history before they chose `target`, the request text
    if there was one, and — for feedback — the served candidates and the items passed over."""

    user_id: str
    history: tuple[str, ...]  # item ids, most recent last
    target: str
    ts: float
    source: str  # "feedback" (a click on a served list) or "clicks" (any next interaction)
    text: str | None = None
    candidates: tuple[str, ...] = ()  # what was served (feedback only)
    negatives: tuple[str, ...] = ()  # served above the target and passed over (feedback only)
    model_version: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> Example:
        data = json.loads(raw)
        for key in ("history", "candidates", "negatives"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)


@dataclass
class Position:
    topic: str
    partition: int
    next_offset: int


@dataclass
class Batch:
    """What one poll of the consumer produced: examples, history updates and where each partition is now."""

    examples: list[Example] = field(default_factory=list)
    histories: dict[str, list[str]] = field(default_factory=dict)
    positions: dict[tuple[str, int], int] = field(default_factory=dict)


class ExampleStore:
    def __init__(
        self,
        path: str | Path,
        *,
        max_examples: int = 200_000,
        replay_size: int = 20_000,
        history_size: int = 200,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_examples, self.replay_size, self.history_size = max_examples, replay_size, history_size
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before offsets move
        # One transaction: a reader (`peek`, another process) sees every table or none.
        self._db.executescript(f"BEGIN IMMEDIATE;{SCHEMA}COMMIT;")
        self._rng = random.Random(self.counter("evicted"))

    @_locked
    def close(self) -> None:
        self._db.close()

    # -- ingestion: examples, histories and positions in one transaction

    @_locked
    def commit(self, batch: Batch) -> None:
        with self._transaction():
            self._db.executemany(
                "INSERT INTO examples (source, ts, user_id, body) VALUES (?, ?, ?, ?)",
                [(e.source, e.ts, e.user_id, e.to_json()) for e in batch.examples],
            )
            self._db.executemany(
                "INSERT INTO histories (user_id, items) VALUES (?, ?) "
                "ON CONFLICT (user_id) DO UPDATE SET items = excluded.items",
                [(user, json.dumps(items[-self.history_size :])) for user, items in batch.histories.items()],
            )
            self._db.executemany(
                "INSERT INTO positions (topic, partition, next_offset) VALUES (?, ?, ?) "
                "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                [(topic, partition, offset) for (topic, partition), offset in batch.positions.items()],
            )
            self._bump("ingested", len(batch.examples))
            self._evict()

    @_locked
    def positions(self) -> dict[tuple[str, int], int]:
        """Where to resume: the offset after the last message whose examples are stored."""
        rows = self._db.execute("SELECT topic, partition, next_offset FROM positions").fetchall()
        return {(topic, partition): offset for topic, partition, offset in rows}

    @_locked
    def history(self, user_id: str) -> list[str]:
        row = self._db.execute("SELECT items FROM histories WHERE user_id = ?", (user_id,)).fetchone()
        return json.loads(row[0]) if row else []

    @_locked
    def histories(self, users: Iterable[str]) -> dict[str, list[str]]:
        return {user: self.history(user) for user in dict.fromkeys(users)}

    # -- reading for a cycle

    @_locked
    def count(self, *, since: int = 0) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM examples WHERE id > ?", (since,)).fetchone()[0])

    @_locked
    def last_id(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM examples").fetchone()[0])

    @_locked
    def examples(
        self, *, after: int = 0, upto: int | None = None, replay: bool | None = None
    ) -> list[tuple[int, Example]]:
        """(id, example) in id order (arrival order) with `after` < id ≤ `upto`."""
        query = "SELECT id, body FROM examples WHERE id > ?"
        args: list = [after]
        if upto is not None:
            query += " AND id <= ?"
            args.append(upto)
        if replay is not None:
            query += " AND replay = ?"
            args.append(int(replay))
        rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [(row_id, Example.from_json(body)) for row_id, body in rows]

    @_locked
    def sample(self, n: int, *, upto: int, seed: int) -> list[Example]:
        """`n` older examples at random (replay against forgetting), with id ≤ `upto`."""
        ids = [r[0] for r in self._db.execute("SELECT id FROM examples WHERE id <= ?", (upto,)).fetchall()]
        chosen = random.Random(seed).sample(ids, min(n, len(ids)))
        if not chosen:
            return []
        marks = ",".join("?" * len(chosen))
        rows = self._db.execute(
            f"SELECT body FROM examples WHERE id IN ({marks}) ORDER BY id", chosen
        ).fetchall()
        return [Example.from_json(r[0]) for r in rows]

    # -- cycles

    @_locked
    def begin_cycle(self, started: float, trained_to: int) -> int:
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO cycles (started, trained_to) VALUES (?, ?)", (started, trained_to)
            )
        return int(cursor.lastrowid)

    @_locked
    def end_cycle(self, cycle: int, finished: float, verdict: dict) -> None:
        with self._transaction():
            self._db.execute(
                "UPDATE cycles SET finished = ?, verdict = ? WHERE id = ?",
                (finished, json.dumps(verdict), cycle),
            )

    @_locked
    def record_published(self, cycle: int, version: int) -> None:
        """The version an accepted cycle's candidate went out as (what a restart reconciles against)."""
        row = self._db.execute("SELECT verdict FROM cycles WHERE id = ?", (cycle,)).fetchone()
        verdict = {
            **(json.loads(row[0]) if row and row[0] else {}),
            "published_version": version,
            "publishing": False,
        }
        with self._transaction():
            self._db.execute("UPDATE cycles SET verdict = ? WHERE id = ?", (json.dumps(verdict), cycle))

    @_locked
    def last_cycle(self) -> dict | None:
        row = self._db.execute(
            "SELECT id, started, finished, trained_to, verdict FROM cycles WHERE finished IS NOT NULL ORDER BY id DESC"
        ).fetchone()
        if row is None:
            return None
        return {
            "id": row[0],
            "started": row[1],
            "finished": row[2],
            "trained_to": row[3],
            "verdict": json.loads(row[4]),
        }

    # -- counters

    @_locked
    def counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _bump(self, name: str, by: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + ?",
            (name, by, by),
        )

    # -- internals

    def _evict(self) -> None:
        """Keep `max_examples`: the oldest go, but a reservoir sample of them stays for replay."""
        live = int(self._db.execute("SELECT COUNT(*) FROM examples WHERE replay = 0").fetchone()[0])
        excess = live - self.max_examples
        if excess <= 0:
            return
        oldest = [
            r[0]
            for r in self._db.execute(
                "SELECT id FROM examples WHERE replay = 0 ORDER BY id LIMIT ?", (excess,)
            )
        ]
        seen = self.counter("evicted")
        kept = [r[0] for r in self._db.execute("SELECT id FROM examples WHERE replay = 1 ORDER BY id")]
        drop: list[int] = []
        for example_id in oldest:
            seen += 1
            if len(kept) < self.replay_size:
                kept.append(example_id)
                self._db.execute("UPDATE examples SET replay = 1 WHERE id = ?", (example_id,))
                continue
            slot = self._rng.randrange(
                seen
            )  # reservoir sampling: every evicted example equally likely to stay
            if slot < self.replay_size:
                drop.append(kept[slot])
                kept[slot] = example_id
                self._db.execute("UPDATE examples SET replay = 1 WHERE id = ?", (example_id,))
            else:
                drop.append(example_id)
        self._db.executemany("DELETE FROM examples WHERE id = ?", [(i,) for i in drop])
        self._bump("evicted", len(oldest))

    class _Transaction:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> None:
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, kind, error, traceback) -> None:
            self.db.execute("ROLLBACK" if kind else "COMMIT")

    def _transaction(self) -> ExampleStore._Transaction:
        return ExampleStore._Transaction(self._db)


def peek(path: str | Path) -> dict[str, int | bool]:
    """Examples stored and whether a cycle is running, read-only (another process owns the store); zeros
    before the worker has created it."""
    path = Path(path)
    nothing = {"examples": 0, "cycles": 0, "running": False}
    if not path.is_file():
        return nothing
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'cycles'").fetchone() is None:
            return nothing  # the file exists, its schema not yet (it is created in one transaction)
        examples = db.execute("SELECT COUNT(*) FROM examples").fetchone()[0]
        finished, running = db.execute(
            "SELECT COUNT(finished), COUNT(*) - COUNT(finished) FROM cycles"
        ).fetchone()
    return {"examples": int(examples), "cycles": int(finished), "running": bool(running)}


def merge_history(history: Sequence[str], item: str, size: int) -> list[str]:
    """A user's history after `item`: it moves to the end (as the stream's context does), bounded."""
    out = [i for i in history if i != item]
    out.append(item)
    return out[-size:]
