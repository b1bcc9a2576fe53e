"""The board's label-free calibration of the prior (edge_agent/calibration.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_agent.calibration import CALIBRATION_FILE, calibrate, fit_prior_bias, load_bias, save_bias

pytestmark = pytest.mark.edge


def leaning_prior(n: int, rng: np.random.Generator, lean: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labels and a backbone that knows something but says class 0 most of the time."""
    y = rng.permutation(np.arange(n) % 2)
    logit = 1.5 * (1 - 2 * y) + rng.normal(0, 1.5, n) + lean  # class 0's logit minus class 1's
    p0 = 1 / (1 + np.exp(-logit))
    return np.stack([p0, 1 - p0], 1), y


def test_the_bias_makes_the_mean_prior_uniform_and_keeps_each_rows_order():
    rng = np.random.default_rng(0)
    for c in (2, 3, 5):
        prior = rng.dirichlet(np.r_[8.0, np.ones(c - 1)], size=400)  # leans to class 0
        assert prior.mean(0)[0] > 0.5
        cal = calibrate(prior, fit_prior_bias(prior))
        np.testing.assert_allclose(cal.mean(0), 1 / c, atol=1e-6)
        np.testing.assert_allclose(cal.sum(1), 1, atol=1e-9)
        # a per-class bias on log p: the ratios between classes move by the same factor in every row
        ratio = np.log(cal[:, 1:] / cal[:, :1]) - np.log(prior[:, 1:] / prior[:, :1])
        assert np.ptp(ratio, axis=0).max() < 1e-9


def test_calibrated_residuals_no_longer_name_the_classes_by_their_norm():
    prior, y = leaning_prior(4000, np.random.default_rng(1))
    def norms(p: np.ndarray) -> list[float]:
        r = np.linalg.norm(np.eye(2)[y] - p, axis=1)
        return [float(r[y == k].mean()) for k in (0, 1)]
    raw = norms(prior)
    assert raw[1] > 3 * raw[0]  # the class the backbone leans away from has the large residuals
    cal = norms(calibrate(prior, fit_prior_bias(prior)))
    assert abs(cal[0] - cal[1]) < 0.01 * max(cal)  # equal for a board with balanced classes


def test_no_bias_is_the_prior_itself_and_the_file_round_trips(tmp_path):
    prior = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert np.array_equal(calibrate(prior, None), prior)
    assert load_bias(tmp_path, 2) is None
    bias = fit_prior_bias(prior)
    save_bias(tmp_path, bias, len(prior))
    assert (tmp_path / CALIBRATION_FILE).stat().st_mode & 0o777 == 0o600
    np.testing.assert_allclose(load_bias(tmp_path, 2), bias)
    assert load_bias(tmp_path, 3) is None  # another task's number of classes: fit a new one
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"bias": "x"}))
    with pytest.raises(ValueError, match="not a calibration file"):
        load_bias(tmp_path, 2)
    with pytest.raises(ValueError):
        fit_prior_bias(np.zeros((0, 2)))
