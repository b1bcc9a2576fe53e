"""`sidetune bench privacy`: the attacks on synthetic features, and the whole command on a tiny backbone."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edge_agent.label_dp import keep_probability
from schemas.spec import HyperParams
from sidetune.bench.accuracy import TaskFeatures
from sidetune.bench.privacy import ATTACKS, privacy_on_features, summarise, target_attacks
from sidetune.cli import main

try:
    from tests.tiny_models import exported_tiny
except ImportError:  # pragma: no cover - run from tests/
    from tiny_models import exported_tiny


def synthetic(n: int = 900, seed: int = 0, shift: float = 2.0) -> TaskFeatures:
    """Labels readable from one direction of every layer; a prior leaning to class 0 (like the demo's prompt)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    states = rng.normal(size=(n, 4, 16))
    states[:, :, 0] += np.where(labels == 0, shift, -shift)[:, None]
    p0 = np.clip(rng.normal(0.85, 0.05, n), 0.5, 0.99)
    return TaskFeatures(states.astype(np.float16), np.stack([p0, 1 - p0], 1).astype(np.float32), labels)


def test_the_target_attacks_read_plain_labels_and_the_norm_rule_names_the_classes():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    p0 = np.clip(rng.normal(0.9, 0.03, 500), 0.5, 0.99)
    prior = np.stack([p0, 1 - p0], 1)
    plain = np.eye(2)[y] - prior  # no mixing: the argmax of the residual is the label
    got = target_attacks(plain, y, 2, lean=0)
    assert got["residual_argmax"] == 1.0 and got["pca_one_known"] == 1.0
    assert got["targets_pc1_norm"] == 1.0  # the larger residuals are the class the prior leans away from
    assert target_attacks(plain, y, 2, lean=1)["targets_pc1_norm"] == 0.0
    assert target_attacks(np.eye(3)[y], y, 3, lean=0)["targets_pc1_norm"] is None
    # the sizes of the sides name the classes where the public majority is the device's majority too
    most = int(np.bincount(y).argmax())
    assert target_attacks(plain, y, 2, lean=0, majority=most)["targets_pc1_count"] == 1.0
    assert target_attacks(plain, y, 2, lean=0, majority=1 - most)["targets_pc1_count"] == 0.0


def test_a_calibrated_prior_leaves_the_norm_rule_nothing_to_read():
    from edge_agent.calibration import calibrate, fit_prior_bias

    rng = np.random.default_rng(4)
    y = rng.permutation(np.arange(1000) % 2)  # a board with balanced classes
    p0 = 1 / (1 + np.exp(-(3.0 + 1.5 * (1 - 2 * y) + rng.normal(0, 1.5, len(y)))))  # knows something, leans to 0
    prior = np.stack([p0, 1 - p0], 1)
    assert target_attacks(np.eye(2)[y] - prior, y, 2, lean=0)["targets_pc1_norm"] > 0.9
    norm = np.linalg.norm(np.eye(2)[y] - calibrate(prior, fit_prior_bias(prior)), axis=1)
    assert abs(norm[y == 0].mean() - norm[y == 1].mean()) < 0.005  # the rule is left with a coin toss


def test_label_dp_brings_the_target_attacks_to_the_randomised_response_rate():
    f = synthetic()
    res = privacy_on_features(f, f, public=300, train=400, holdout=200, splits=2,
                              hyper=HyperParams(epochs=5, lr=3e-3), cpu_per_sample=0.01, progress=lambda m: None)
    out = summarise("synthetic", res)
    json.dumps(out)
    assert set(out) == {"task", "chance", "defences", "default"} and out["default"] == "label_dp"
    assert {"none", "label_dp"} <= set(out["defences"]) and "board_training" not in out["defences"]
    for name, d in out["defences"].items():
        assert set(d) == {"params", "task_accuracy", "device_cpu_s", "attacks"} and set(d["attacks"]) == set(ATTACKS)
        assert d["device_cpu_s"] >= 0.01 * 400 and d["task_accuracy"] > 0.7, (name, d)
    none, dp = out["defences"]["none"], out["defences"]["label_dp"]
    assert none["params"] == {} and dp["params"] == {"epsilon": 2.0}
    raw = out["defences"]["label_dp_uncalibrated"]
    assert raw["params"] == {"epsilon": 2.0, "calibrated": False}
    assert none["attacks"]["pca_one_known"] > 0.99  # without label-DP the partition is the labels
    keep = keep_probability(2.0, 2)
    # the raw prior leans to class 0: the norm rule names the classes with no known example
    assert abs(raw["attacks"]["targets_pc1_norm"] - keep) < 0.05, raw["attacks"]
    assert abs(dp["attacks"]["pca_one_known"] - keep) < 0.05, dp["attacks"]
    for a in ("targets_pc1_norm", "targets_pc1_count", "residual_argmax"):  # never beyond what ε allows
        assert dp["attacks"][a] < keep + 0.05, (a, dp["attacks"][a], keep)
    # the activations are the same under either defence, and a public probe reads them
    assert dp["attacks"]["public_probe_true_prompt"] == none["attacks"]["public_probe_true_prompt"] > 0.9
    assert none["attacks"]["text_match"] == 1.0  # the same prompt, the same text: the same activations
    assert math.isclose(out["chance"], np.bincount(f.labels).max() / len(f.labels), abs_tol=1e-4)


def test_the_command_writes_results_report_and_plot_on_a_tiny_backbone(tmp_path_factory, tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.setenv("SIDETUNE_HOME", str(tmp_path / "home"))  # no feature cache in the real home
    backbone = exported_tiny(tmp_path_factory, "llama")[0]
    out = tmp_path / "out"
    assert main(["bench", "privacy", "--backbone", str(backbone), "--out", str(out), "--public", "40",
                 "--train", "60", "--holdout", "30", "--splits", "1", "--epochs", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "chat" and set(res["defences"]["label_dp"]["attacks"]) == set(ATTACKS)
    assert (out / "plot.svg").read_text().startswith("<svg")
    report = (out / "report.md").read_text()
    assert "plot.svg" in report and "label_dp" in report and "board_training" in report
    assert "results.json" in capsys.readouterr().out


def test_the_command_explains_bad_input(tmp_path, capsys):
    assert main(["bench", "privacy", "--backbone", str(tmp_path)]) == 2
    assert "holds no exported backbone" in capsys.readouterr().err
    assert main(["bench", "privacy", "--splits", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_too_few_samples_is_a_clear_error():
    f = synthetic(100)
    with pytest.raises(ValueError, match="more than the 100 samples"):
        privacy_on_features(f, f, public=50, train=50, holdout=10, splits=1, hyper=HyperParams(),
                            cpu_per_sample=0.0)
