"""The boards' shards of ``sidetune bench cohort``: one task's training data split over N boards.

Two ways, from the same rows and the same held-out set (drawn first, uniformly, and scored by
every board):

* ``iid`` — the rest of the rows shuffled and cut into N shards of ``per_board``;
* ``dirichlet`` — label-skewed: board b draws its class shares ``p_b ~ Dir(α·1)`` over the C
  classes (α = 0.5 by default), then ``per_board`` rows, class by class, without replacement from
  what the boards before it left. A class that runs out gives its remaining draws to the board's
  other classes in proportion to ``p_b``, so every shard has exactly ``per_board`` rows.

Seeded (``seed``): the same rows give the same shards. ``news_shards`` does this for the news task
of ``sidetune bench compare`` (``sidetune/data.py`` ``load_news``, seven outlets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from schemas.errors import UsageError
from sidetune.data import Review

KINDS = ("iid", "dirichlet")
DEFAULT_BOARDS, DEFAULT_PER_BOARD, DEFAULT_HOLDOUT, DEFAULT_ALPHA = 8, 250, 400, 0.5


@dataclass(frozen=True)
class Shards:
    """N boards' training rows and the held-out rows every board is scored on."""

    kind: str
    boards: tuple[tuple[Review, ...], ...]
    holdout: tuple[Review, ...]
    classes: tuple[str, ...]
    alpha: float | None
    seed: int

    def histogram(self) -> np.ndarray:
        """(boards, classes) counts of each board's labels."""
        index = {c: i for i, c in enumerate(self.classes)}
        out = np.zeros((len(self.boards), len(self.classes)), dtype=np.int64)
        for b, rows in enumerate(self.boards):
            for r in rows:
                out[b, index[r.label]] += 1
        return out

    def pooled(self) -> tuple[Review, ...]:
        """Every board's rows, board after board (what central training sees)."""
        return tuple(r for rows in self.boards for r in rows)

    def summary(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "boards": len(self.boards),
            "per_board": [len(b) for b in self.boards],
            "holdout": len(self.holdout),
            "alpha": self.alpha,
            "seed": self.seed,
            "classes": list(self.classes),
            "histogram": self.histogram().tolist(),
        }


def _dirichlet(
    pool: list[Review],
    classes: Sequence[str],
    boards: int,
    per_board: int,
    alpha: float,
    rng: np.random.Generator,
) -> list[list[Review]]:
    by_class: list[list[Review]] = [[r for r in pool if r.label == c] for c in classes]
    out = []
    for _ in range(boards):
        share = rng.dirichlet(np.full(len(classes), alpha))
        want = rng.multinomial(per_board, share)
        take = np.zeros(len(classes), dtype=np.int64)
        left = per_board
        while left > 0:  # fill each class up to what it still has; the rest goes to the others
            room = np.array([len(by_class[c]) for c in range(len(classes))]) - take
            grant = np.minimum(want, room)
            take += grant
            left = per_board - int(take.sum())
            if left == 0:
                break
            open_ = (room - grant) > 0
            weights = share * open_
            if weights.sum() <= 0:  # the board's classes are all used up: any class that has rows
                weights = open_.astype(float)
            want = rng.multinomial(left, weights / weights.sum())
        rows: list[Review] = []
        for c, k in enumerate(take.tolist()):
            rows += by_class[c][:k]
            by_class[c] = by_class[c][k:]
        out.append([rows[i] for i in rng.permutation(len(rows))])
    return out


def make_shards(
    rows: Sequence[Review],
    classes: Sequence[str],
    *,
    boards: int = DEFAULT_BOARDS,
    per_board: int = DEFAULT_PER_BOARD,
    holdout: int = DEFAULT_HOLDOUT,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
) -> dict[str, Shards]:
    """``{"iid": Shards, "dirichlet": Shards}`` of ``rows``, both with the same held-out rows."""
    if boards < 1 or per_board < 1 or holdout < 1:
        raise UsageError(
            f"boards ({boards}), samples per board ({per_board}) and held-out samples "
            f"({holdout}) must each be at least 1"
        )
    if not alpha > 0:
        raise UsageError(f"the Dirichlet concentration must be positive, not {alpha}")
    classes = tuple(classes)
    unknown = sorted({r.label for r in rows} - set(classes))
    if unknown:
        raise UsageError(f"rows with labels outside the task's classes: {', '.join(unknown[:5])}")
    need = boards * per_board + holdout
    if need > len(rows):
        raise UsageError(
            f"{boards} boards × {per_board} samples + {holdout} held-out = {need} is more "
            f"than the {len(rows)} samples of the data set"
        )
    rng = np.random.default_rng([seed, 20])
    perm = rng.permutation(len(rows))
    held = tuple(rows[i] for i in perm[:holdout])
    pool = [rows[i] for i in perm[holdout:]]
    iid = [tuple(pool[b * per_board : (b + 1) * per_board]) for b in range(boards)]
    skew = _dirichlet(pool, classes, boards, per_board, alpha, np.random.default_rng([seed, 21]))
    return {
        "iid": Shards("iid", tuple(iid), held, classes, None, seed),
        "dirichlet": Shards("dirichlet", tuple(tuple(b) for b in skew), held, classes, alpha, seed),
    }


def news_shards(
    *,
    boards: int = DEFAULT_BOARDS,
    per_board: int = DEFAULT_PER_BOARD,
    holdout: int = DEFAULT_HOLDOUT,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
) -> dict[str, Shards]:
    """The news task's shards (the rows and classes ``sidetune bench compare --task news`` uses)."""
    from sidetune.bench.compare import task_data

    _, task, rows = task_data("news")
    return make_shards(
        rows,
        task.classes,
        boards=boards,
        per_board=per_board,
        holdout=holdout,
        alpha=alpha,
        seed=seed,
    )
