"""The board's ledger (SQLite, WAL): samples, rounds, and the outbox.

* ``samples``: every distinct labelled sample (key = HMAC of its token ids),
  its prior ``p_b`` once computed, its pivot states until the server holds
  them, the round whose adapter it went into (NULL = new), and the label its
  targets report (``sent_label``, randomised response drawn once with
  ``sent_epsilon``, edge_agent/label_dp.py; NULL until its first round).
* ``rounds``: one row per round, with what the demo reports.
* ``outbox``: encoded messages not yet acknowledged by the broker; they
  survive broker outages and agent restarts (paho keeps its session in memory).

It holds token ids and labels: the file is 0600 whatever the umask (SQLite gives
its -wal and -shm files the database file's mode).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    key TEXT PRIMARY KEY, label INTEGER NOT NULL, token_ids BLOB NOT NULL,
    prior BLOB, states BLOB, round INTEGER, added REAL NOT NULL, sent_label INTEGER, sent_epsilon REAL
);
CREATE INDEX IF NOT EXISTS samples_round ON samples(round);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, job_id TEXT NOT NULL, state TEXT NOT NULL,
    samples INTEGER, new_samples INTEGER, forward_passes INTEGER DEFAULT 0,
    bytes_up INTEGER DEFAULT 0, bytes_down INTEGER DEFAULT 0,
    zero_shot_accuracy REAL, tuned_accuracy REAL, adapter_version INTEGER,
    job_payload BLOB, started REAL, finished REAL, seconds REAL, detail TEXT
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0, round INTEGER
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""

ROUND_FIELDS = ("round", "job_id", "state", "samples", "new_samples", "forward_passes", "bytes_up", "bytes_down",
                "zero_shot_accuracy", "tuned_accuracy", "adapter_version", "started", "finished", "seconds", "detail")


@dataclass
class Sample:
    key: str
    label: int
    token_ids: list[int]
    prior: np.ndarray | None
    states: bytes | None  # float16 (L+1, d)
    sent_label: int | None = None  # the randomised label the targets report (None: not drawn yet)


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Columns added since the first ledgers: a ledger from an older agent gains them, empty."""
        with self.tx() as db:
            have = {row[1] for row in db.execute("PRAGMA table_info(samples)")}
            for col, kind in (("sent_label", "INTEGER"), ("sent_epsilon", "REAL")):
                if col not in have:
                    db.execute(f"ALTER TABLE samples ADD COLUMN {col} {kind}")

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------ samples

    def add_samples(self, rows: list[tuple[str, int, list[int]]]) -> int:
        """Insert new samples (key, label, token ids); returns how many were new."""
        now = time.time()
        with self.tx() as db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO samples(key, label, token_ids, added) VALUES (?, ?, ?, ?)",
                [(k, y, np.asarray(ids, "<i4").tobytes(), now) for k, y, ids in rows],
            )
            return db.total_changes - before

    def label_of(self, key: str) -> int | None:
        with self._lock:
            row = self.db.execute("SELECT label FROM samples WHERE key=?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def count_new(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COUNT(*) FROM samples WHERE round IS NULL").fetchone()[0])

    def samples(self, where: str = "1=1", args: tuple[object, ...] = ()) -> list[Sample]:
        with self._lock:
            rows = self.db.execute("SELECT key, label, token_ids, prior, states, sent_label FROM samples "
                                   f"WHERE {where} ORDER BY added, key", args).fetchall()
        return [Sample(k, int(y), np.frombuffer(t, "<i4").tolist(), None if p is None else np.frombuffer(p, "<f4").copy(), s,
                       None if z is None else int(z))
                for k, y, t, p, s, z in rows]

    def samples_by_key(self, keys: list[str]) -> dict[str, Sample]:
        """The samples of these keys (unknown keys are left out)."""
        out: dict[str, Sample] = {}
        for i in range(0, len(keys), 500):  # SQLite's limit on bound parameters
            part = tuple(keys[i : i + 500])
            out.update((s.key, s) for s in self.samples(f"key IN ({','.join('?' * len(part))})", part))
        return out

    def set_features(self, items: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        """Store prior (C,) and states (L+1, d) of freshly computed samples."""
        with self.tx() as db:
            db.executemany("UPDATE samples SET prior=?, states=? WHERE key=?",
                           [(p.astype("<f4").tobytes(), s.astype("<f2").tobytes(), k) for k, p, s in items])

    def draw_sent_labels(self, num_classes: int, epsilon: float, rng: np.random.Generator) -> int:
        """Draw the reported label (randomised response, ε) of every sample that has none yet; a
        sample's draw is kept for good (a fresh one each round would average the noise away).
        Returns how many were drawn."""
        from edge_agent.label_dp import randomize

        with self.tx() as db:
            rows = db.execute("SELECT key, label FROM samples WHERE sent_label IS NULL ORDER BY added, key").fetchall()
            if not rows:
                return 0
            noisy = randomize(np.array([int(y) for _, y in rows]), num_classes, epsilon, rng)
            db.executemany("UPDATE samples SET sent_label=?, sent_epsilon=? WHERE key=? AND sent_label IS NULL",
                           [(int(z), float(epsilon), k) for (k, _), z in zip(rows, noisy)])
            return len(rows)

    def assign_round(self, keys: list[str], rnd: int) -> None:
        with self.tx() as db:
            db.executemany("UPDATE samples SET round=?, states=NULL WHERE key=? AND round IS NULL",
                           [(rnd, k) for k in keys])

    # ------------------------------------------------------------ rounds

    def new_round(self, job_id: str, samples: int, new_samples: int) -> int:
        with self.tx() as db:
            cur = db.execute("INSERT INTO rounds(job_id, state, samples, new_samples, started) VALUES (?, 'preparing', ?, ?, ?)",
                             (job_id, samples, new_samples, time.time()))
            return int(cur.lastrowid or 0)

    def update_round(self, rnd: int, **fields: object) -> None:
        bad = set(fields) - set(ROUND_FIELDS) - {"job_payload"}
        if bad:
            raise KeyError(f"unknown round fields {bad}")
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.tx() as db:
            db.execute(f"UPDATE rounds SET {sets} WHERE round=?", (*fields.values(), rnd))

    def add_round_counts(self, rnd: int, forward_passes: int = 0, bytes_up: int = 0, bytes_down: int = 0) -> None:
        with self.tx() as db:
            db.execute("UPDATE rounds SET forward_passes=forward_passes+?, bytes_up=bytes_up+?, bytes_down=bytes_down+? "
                       "WHERE round=?", (forward_passes, bytes_up, bytes_down, rnd))

    def open_round(self) -> dict[str, Any] | None:
        with self._lock:
            row = self.db.execute(
                f"SELECT {', '.join(ROUND_FIELDS)}, job_payload FROM rounds WHERE state NOT IN ('done', 'failed') "
                "ORDER BY round DESC LIMIT 1").fetchone()
        return None if row is None else dict(zip((*ROUND_FIELDS, "job_payload"), row))

    def rounds(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.execute(f"SELECT {', '.join(ROUND_FIELDS)} FROM rounds ORDER BY round").fetchall()
        return [dict(zip(ROUND_FIELDS, r)) for r in rows]

    # ------------------------------------------------------------ outbox

    def enqueue(self, items: list[tuple[str, bytes, bool]], rnd: int | None = None) -> None:
        with self.tx() as db:
            db.executemany("INSERT INTO outbox(topic, payload, retain, round) VALUES (?, ?, ?, ?)",
                           [(t, p, int(r), rnd) for t, p, r in items])

    def outbox_after(self, last_id: int, limit: int) -> list[tuple[int, str, bytes, bool, int | None]]:
        with self._lock:
            rows = self.db.execute("SELECT id, topic, payload, retain, round FROM outbox WHERE id>? ORDER BY id LIMIT ?",
                                   (last_id, limit)).fetchall()
        return [(int(i), t, bytes(p), bool(r), rn) for i, t, p, r, rn in rows]

    def outbox_done(self, row_id: int) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM outbox WHERE id=?", (row_id,))

    def outbox_size(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    # ------------------------------------------------------------ meta

    def get_meta(self, k: str) -> str | None:
        with self._lock:
            row = self.db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, k: str, v: str) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO meta(k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v=excluded.v", (k, v))
