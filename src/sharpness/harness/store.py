"""The experiments store: one SQLite file; a finished run is written once, atomically, with its epochs.

A run is identified by the hash of its canonical config (``run_key``), so a sweep asks ``store.has(key)``
and skips finished runs; the primary key makes a duplicate impossible even if two processes race. A run that
is killed before ``write_run`` leaves nothing in the store (its checkpoint, kept elsewhere, resumes it).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import atomic_open, write_text_atomically

__all__ = ["RunRecord", "Store", "run_key"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_key     TEXT PRIMARY KEY,
    config      TEXT NOT NULL,
    summary     TEXT NOT NULL,
    environment TEXT NOT NULL,
    finished_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS epochs (
    run_key TEXT NOT NULL REFERENCES runs(run_key),
    epoch   INTEGER NOT NULL,
    record  TEXT NOT NULL,
    PRIMARY KEY (run_key, epoch)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_OPEN_TIMEOUT_S = 60.0  # how long opening waits for other processes creating or writing the store
_SCHEMA_VERSION = "1"


def _canonical(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)


def run_key(config: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit id of a run's config (key order and whitespace do not matter)."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunRecord:
    """One finished run as stored: config, summary, environment and its per-epoch records."""

    run_key: str
    config: dict[str, Any]
    summary: dict[str, Any]
    environment: dict[str, Any]
    finished_at: float
    epochs: tuple[dict[str, Any], ...]


class Store:
    """A SQLite experiments store (``Store(path)``; ``":memory:"`` for tests)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            parent = Path(self.path).parent
            if not parent.exists():
                raise FileNotFoundError(f"Store directory does not exist: {parent}")
        deadline = time.monotonic() + _OPEN_TIMEOUT_S
        delay = 0.01
        while True:
            try:
                self._open()
                return
            except sqlite3.OperationalError as exc:
                # Processes opening a new store together (torchrun ranks, sweep workers) race for the switch to
                # WAL, for which SQLite reports "database is locked" at once instead of waiting: retry.
                self._close_quietly()
                if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                    raise ValueError(f"Cannot open the results store {self.path}: {exc}") from exc
                time.sleep(delay)
                delay = min(2 * delay, 0.5)
            except sqlite3.DatabaseError as exc:
                self._close_quietly()
                raise ValueError(f"Not a sharpness results store (or a corrupted one): {self.path}: {exc}") from exc

    def _close_quietly(self) -> None:
        conn, self._conn = getattr(self, "_conn", None), None
        if conn is not None:
            conn.close()

    def _open(self) -> None:
        self._conn = sqlite3.connect(self.path, timeout=_OPEN_TIMEOUT_S, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL" if self.path != ":memory:" else "PRAGMA journal_mode=MEMORY")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._transaction():
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._conn.execute(statement)
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (_SCHEMA_VERSION,))
            elif row[0] != _SCHEMA_VERSION:
                raise ValueError(f"Unsupported store schema version {row[0]!r} in {self.path} "
                                 f"(expected {_SCHEMA_VERSION})")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, key: str) -> bool:
        return self._conn.execute("SELECT 1 FROM runs WHERE run_key=?", (key,)).fetchone() is not None

    def write_run(self, config: Mapping[str, Any], summary: Mapping[str, Any], epochs: Sequence[Mapping[str, Any]],
                  environment: Mapping[str, Any]) -> tuple[str, bool]:
        """Insert a finished run and its epochs in one transaction. Returns ``(run_key, inserted)``.

        A run already present is left untouched (``inserted=False``): rerunning a sweep never duplicates.
        """
        key = run_key(config)
        with self._transaction():
            cursor = self._conn.execute(
                "INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?)",
                (key, _canonical(config), json.dumps(summary, allow_nan=True), json.dumps(environment),
                 time.time()),
            )
            if cursor.rowcount == 0:
                return key, False
            self._conn.executemany(
                "INSERT INTO epochs VALUES (?, ?, ?)",
                [(key, index, json.dumps(record, allow_nan=True)) for index, record in enumerate(epochs)],
            )
        return key, True

    def runs(self) -> list[RunRecord]:
        """Every finished run, oldest first, with its epochs."""
        rows = self._conn.execute(
            "SELECT run_key, config, summary, environment, finished_at FROM runs ORDER BY finished_at, run_key"
        ).fetchall()
        out = []
        for key, config, summary, environment, finished_at in rows:
            epochs = self._conn.execute(
                "SELECT record FROM epochs WHERE run_key=? ORDER BY epoch", (key,)
            ).fetchall()
            out.append(RunRecord(key, json.loads(config), json.loads(summary), json.loads(environment),
                                 finished_at, tuple(json.loads(r[0]) for r in epochs)))
        return out

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    # ------------------------------------------------------------------------------------------- export
    def export_json(self, path: str | os.PathLike[str]) -> None:
        """All runs (config, summary, environment, epochs) as one JSON document, written atomically."""
        payload = [
            {"run_key": r.run_key, "config": r.config, "summary": r.summary, "environment": r.environment,
             "finished_at": r.finished_at, "epochs": list(r.epochs)}
            for r in self.runs()
        ]
        write_text_atomically(path, json.dumps(payload, indent=2, allow_nan=True))

    def export_csv(self, path: str | os.PathLike[str]) -> None:
        """One row per run: ``run_key``, flattened ``config.*`` and ``summary.*`` columns, written atomically."""
        rows = []
        for r in self.runs():
            row = {"run_key": r.run_key}
            row.update({f"config.{k}": _cell(v) for k, v in sorted(r.config.items())})
            row.update({f"summary.{k}": _cell(v) for k, v in sorted(r.summary.items())})
            rows.append(row)
        columns = sorted({c for row in rows for c in row}, key=lambda c: (c != "run_key", c))
        with atomic_open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value

