"""What `sidetune demo` runs: its task and its data shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from sidetune.data import DataError, Review, shards
from sidetune.demo import TASK

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_runs_the_task_the_deploy_example_ships():
    """deploy/task.example.toml documents the demo's prompt: the two must not drift apart."""
    assert tomllib.loads(TASK) == tomllib.loads((ROOT / "deploy" / "task.example.toml").read_text())


def test_shards_are_disjoint_and_sized():
    reviews = [Review(f"review {i}", "fresh" if i % 2 else "rotten") for i in range(100)]
    parts = shards(reviews, devices=3, train=20, holdout=10, seed=1)
    assert [(len(tr), len(ho)) for tr, ho in parts] == [(20, 10)] * 3
    seen = [r.text for tr, ho in parts for r in tr + ho]
    assert len(seen) == len(set(seen)) == 90
    assert parts == shards(reviews, devices=3, train=20, holdout=10, seed=1)
    with pytest.raises(DataError, match="101 reviews"):
        shards(reviews, devices=1, train=100, holdout=1)
