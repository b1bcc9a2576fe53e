"""`sidetune bench cohort`'s shards: disjoint boards of the asked size, one shared held-out set, IID
against label-skewed (Dirichlet), seeded, and clear errors for what cannot be drawn."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.errors import UsageError
from sidetune.bench.shards import make_shards, news_shards
from sidetune.data import Review

CLASSES = ("a", "b", "c", "d", "e", "f", "g")


def _rows(n: int = 1400) -> list[Review]:
    rng = np.random.default_rng(5)
    return [Review(f"text {i}", CLASSES[int(c)]) for i, c in enumerate(rng.integers(0, 7, n))]


def _skew(hist: np.ndarray) -> float:
    """Mean total-variation distance of each board's label shares from the pooled shares."""
    p = hist / hist.sum(1, keepdims=True)
    q = hist.sum(0) / hist.sum()
    return float(np.mean(0.5 * np.abs(p - q).sum(1)))


def test_shards_are_disjoint_sized_and_share_one_holdout():
    rows = _rows()
    out = make_shards(rows, CLASSES, boards=4, per_board=150, holdout=200, seed=3)
    assert list(out) == ["iid", "dirichlet"]
    assert out["iid"].holdout == out["dirichlet"].holdout and len(out["iid"].holdout) == 200
    for kind, s in out.items():
        assert s.kind == kind and [len(b) for b in s.boards] == [150] * 4
        texts = [r.text for r in s.pooled()]
        assert len(set(texts)) == 600, kind  # no row on two boards
        assert not set(texts) & {r.text for r in s.holdout}, kind  # none held out
        assert s.histogram().sum() == 600 and s.histogram().shape == (4, 7)
    assert out["dirichlet"].alpha == 0.5 and out["iid"].alpha is None
    # label-skewed shards are far more skewed than IID ones
    assert _skew(out["dirichlet"].histogram()) > 0.25 > 0.12 > _skew(out["iid"].histogram())
    summary = out["dirichlet"].summary()
    assert (
        summary["per_board"] == [150] * 4
        and summary["histogram"] == out["dirichlet"].histogram().tolist()
    )


def test_shards_are_seeded():
    rows = _rows()
    a = make_shards(rows, CLASSES, boards=3, per_board=100, holdout=50, seed=1)
    b = make_shards(rows, CLASSES, boards=3, per_board=100, holdout=50, seed=1)
    c = make_shards(rows, CLASSES, boards=3, per_board=100, holdout=50, seed=2)
    assert a == b
    assert a["dirichlet"].boards != c["dirichlet"].boards and a["iid"].holdout != c["iid"].holdout


def test_a_class_that_runs_out_gives_its_draws_to_the_others():
    # very skewed (α = 0.05) and nearly every row used: boards still get exactly per_board rows
    rows = _rows(700)
    out = make_shards(rows, CLASSES, boards=6, per_board=100, holdout=90, alpha=0.05, seed=0)
    s = out["dirichlet"]
    assert [len(b) for b in s.boards] == [100] * 6
    assert len({r.text for r in s.pooled()}) == 600


def test_what_cannot_be_drawn_is_a_usage_error():
    rows = _rows(300)
    with pytest.raises(
        UsageError, match=r"8 boards × 250 samples \+ 400 held-out = 2400 is more than the 300"
    ):
        make_shards(rows, CLASSES)
    with pytest.raises(UsageError, match="must each be at least 1"):
        make_shards(rows, CLASSES, boards=0)
    with pytest.raises(UsageError, match="concentration must be positive"):
        make_shards(rows, CLASSES, boards=2, per_board=10, holdout=10, alpha=0.0)
    with pytest.raises(UsageError, match="outside the task's classes: zz"):
        make_shards([*rows, Review("x", "zz")], CLASSES, boards=2, per_board=10, holdout=10)


def test_news_shards_default_sizes():
    out = news_shards()
    for s in out.values():
        assert [len(b) for b in s.boards] == [250] * 8 and len(s.holdout) == 400
        assert len(s.classes) == 7
    assert _skew(out["dirichlet"].histogram()) > 2 * _skew(out["iid"].histogram())
