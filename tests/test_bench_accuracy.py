"""`sidetune bench accuracy`: the comparison itself on synthetic features, the feature cache on a tiny
exported backbone, and the command's errors."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.backbone import Backbone
from schemas.spec import HyperParams
from sidetune.bench.accuracy import (
    TaskFeatures,
    builtin_task,
    compare_on_features,
    extract_all,
    fit_bias,
    format_report,
)
from sidetune.cli import main
from sidetune.data import Review

try:
    from tests.tiny_models import exported_tiny
except ImportError:  # pragma: no cover - run from tests/
    from tiny_models import exported_tiny


def synthetic(n: int = 600, seed: int = 0) -> TaskFeatures:
    """Labels readable from one direction of the last layer; a prior that is right only 60 % of the time."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    states = rng.normal(size=(n, 4, 16))
    states[:, 3, 0] += np.where(labels == 0, 2.0, -2.0)
    right = rng.random(n) < 0.6
    p0 = np.where((labels == 0) == right, 0.6, 0.4)
    prior = np.stack([p0, 1 - p0], 1).astype(np.float32)
    return TaskFeatures(states.astype(np.float16), prior, labels)


def test_the_side_network_learns_what_the_prior_misses_with_and_without_mixing():
    res = compare_on_features(synthetic(), train=400, holdout=200, splits=2, hyper=HyperParams(epochs=30, lr=3e-3),
                              progress=lambda m: None)
    for k in ("zero_shot", "recalibrated", "mixed", "clear"):
        assert len(res[k]["splits"]) == 2 and res[k]["mean"] == pytest.approx(np.mean(res[k]["splits"]))
    assert 0.5 < res["zero_shot"]["mean"] < 0.7 and 0.5 < res["recalibrated"]["mean"] < 0.7
    assert res["mixed"]["mean"] > 0.9 and res["clear"]["mean"] > 0.9
    again = compare_on_features(synthetic(), train=400, holdout=200, splits=2, hyper=HyperParams(epochs=30, lr=3e-3),
                                progress=lambda m: None)
    assert again == res  # the splits, the secrets and the training are seeded
    table = format_report({"splits": 2, "reviews": 600, "train": 400, "holdout": 200, "hyper": {"epochs": 30},
                           "noise_std": 0.25,
                           "tasks": [{"task": "synthetic", "seconds": 1.0, **res}]})
    assert f"{res['mixed']['mean']:.3f} ± {res['mixed']['std']:.3f}" in table


def test_recalibration_removes_a_prior_s_lean():
    """A prior that always leans to class 0 but ranks the samples right: one bias fixes it."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 500)
    p0 = np.clip(np.where(labels == 0, 0.95, 0.75) + rng.normal(0, 0.02, 500), 0.01, 0.99)
    prior = np.stack([p0, 1 - p0], 1)
    assert np.mean(prior.argmax(1) == labels) < 0.6
    b = fit_bias(prior[:300], labels[:300])
    assert np.mean((np.log(prior[300:]) + b).argmax(1) == labels[300:]) > 0.95


def test_too_few_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="more than the 600 samples"):
        compare_on_features(synthetic(), train=500, holdout=200, splits=1, hyper=HyperParams())


def test_features_are_computed_once_per_task(tmp_path_factory, tmp_path):
    bb = Backbone.load(exported_tiny(tmp_path_factory, "llama")[0], threads=1)
    reviews = [Review(f"a {'good' if i % 2 else 'dull'} film number {i}", "fresh" if i % 2 else "rotten")
               for i in range(20)]
    said: list[str] = []
    plain = builtin_task("plain")
    first = extract_all(bb, plain, reviews, tmp_path, max_length=32, progress=said.append)
    assert first.states.shape == (20, bb.num_layers + 1, bb.hidden_size) and first.states.dtype == np.float16
    assert list(first.labels) == [1 - (i % 2) for i in range(20)]  # classes are (fresh, rotten)
    assert any("forward passes 20/20" in m for m in said)
    said.clear()
    again = extract_all(bb, plain, reviews, tmp_path, max_length=32, progress=said.append)
    assert said and "from" in said[0] and not any("forward passes" in m for m in said)
    np.testing.assert_array_equal(again.states, first.states)
    chat = extract_all(bb, builtin_task("chat"), reviews, tmp_path, max_length=32, progress=said.append)
    assert any("forward passes" in m for m in said) and len(list(tmp_path.glob("features-*.npz"))) == 2
    assert not np.allclose(chat.prior, first.prior)


def test_the_command_explains_a_missing_backbone_and_bad_numbers(tmp_path, capsys):
    assert main(["bench", "accuracy", "--backbone", str(tmp_path)]) == 2
    assert "holds no exported backbone" in capsys.readouterr().err
    assert main(["bench", "accuracy", "--splits", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_the_command_explains_a_bad_task_file(tmp_path_factory, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SIDETUNE_HOME", str(tmp_path))  # no feature cache in the real home
    backbone = exported_tiny(tmp_path_factory, "llama")[0]
    missing = tmp_path / "missing.toml"
    assert main(["bench", "accuracy", "--backbone", str(backbone), "--task", str(missing)]) == 2
    assert "not found" in capsys.readouterr().err
    other = tmp_path / "other.toml"
    other.write_text('name = "x"\ntemplate = "{text} is"\nclasses = ["good", "bad"]\nverbalizers = [" good", " bad"]\n')
    assert main(["bench", "accuracy", "--backbone", str(backbone), "--task", str(other), "--train", "5",
                 "--holdout", "5", "--splits", "1"]) == 2
    assert "unknown class 'fresh'" in capsys.readouterr().err

