"""Label-DP on the board: randomised response drawn once per sample, kept in the ledger, resent unchanged."""

from __future__ import annotations

import math
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from edge_agent.config import EdgeSettings
from edge_agent.label_dp import keep_probability, randomize
from edge_agent.ledger import Ledger

N = 200_000


def _tolerance(p: float, n: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)  # 5 standard deviations of a binomial rate


@pytest.mark.edge
@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0, 4.0])
def test_two_classes_keep_the_label_with_probability_e_eps_over_1_plus_e_eps(epsilon):
    keep = math.exp(epsilon) / (1 + math.exp(epsilon))
    assert keep_probability(epsilon, 2) == pytest.approx(keep)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, N)
    z = randomize(y, 2, epsilon, rng)
    assert abs(np.mean(z == y) - keep) < _tolerance(keep, N)
    for c in (0, 1):  # the same rate for either class: the mechanism does not depend on which label it hides
        assert abs(np.mean(z[y == c] == c) - keep) < _tolerance(keep, int((y == c).sum()))


@pytest.mark.edge
@pytest.mark.parametrize("classes", [3, 5])
def test_k_ary_randomised_response(classes):
    epsilon = 2.0
    keep = math.exp(epsilon) / (math.exp(epsilon) + classes - 1)
    assert keep_probability(epsilon, classes) == pytest.approx(keep)
    rng = np.random.default_rng(2)
    y = rng.integers(0, classes, N)
    z = randomize(y, classes, epsilon, rng)
    assert abs(np.mean(z == y) - keep) < _tolerance(keep, N)
    other = (1 - keep) / (classes - 1)  # each other class equally likely
    for c in range(classes):
        for d in range(classes):
            if d != c:
                n = int((y == c).sum())
                assert abs(np.mean(z[y == c] == d) - other) < _tolerance(other, n)
    # ε-DP: P(z | y) / P(z | y') ≤ e^ε for the two probabilities the mechanism has
    assert keep / other == pytest.approx(math.exp(epsilon))


@pytest.mark.edge
def test_inf_is_off_and_bad_epsilons_are_refused():
    y = np.arange(10) % 3
    assert keep_probability(math.inf, 3) == 1.0
    assert (randomize(y, 3, math.inf, np.random.default_rng(0)) == y).all()
    assert keep_probability(1000.0, 2) == pytest.approx(1.0)  # no overflow
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError):
            keep_probability(bad, 2)
    with pytest.raises(ValueError):
        keep_probability(1.0, 1)
    with pytest.raises(ValueError):
        randomize(np.array([0, 2]), 2, 1.0, np.random.default_rng(0))


@pytest.mark.edge
def test_the_setting_defaults_to_two_takes_inf_from_toml_and_refuses_zero(tmp_path):
    from schemas.settings import load_settings

    base = dict(device_id="board-1", state_dir=tmp_path, backbone_dir=tmp_path, task_file=tmp_path / "t.toml")
    assert EdgeSettings(**base).label_epsilon == 2.0  # type: ignore[arg-type]
    for bad in (0, -2, float("nan")):
        with pytest.raises(ValidationError):
            EdgeSettings(**base, label_epsilon=bad)  # type: ignore[arg-type]
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'device_id = "board-1"\nstate_dir = "{tmp_path}"\nbackbone_dir = "{tmp_path}"\n'
                   f'task_file = "{tmp_path}/t.toml"\nlabel_epsilon = inf\n')
    assert math.isinf(load_settings(EdgeSettings, cfg).label_epsilon)


@pytest.mark.edge
def test_the_ledger_draws_each_label_once(tmp_path):
    ledger = Ledger(tmp_path / "state.db")
    rows = [(f"k{i:04d}", i % 2, [1, 2, i]) for i in range(400)]
    ledger.add_samples(rows)
    assert all(s.sent_label is None for s in ledger.samples())
    assert ledger.draw_sent_labels(2, 2.0, np.random.default_rng(0)) == 400
    first = {s.key: s.sent_label for s in ledger.samples()}
    flips = sum(first[k] != y for k, y, _ in rows)
    assert 0 < flips < 400 * 0.25  # about 11.9 %
    # later draws (another ε, another seed) leave drawn samples alone; new samples get theirs
    ledger.add_samples([("new", 1, [9])])
    assert ledger.draw_sent_labels(2, 0.1, np.random.default_rng(99)) == 1
    again = {s.key: s.sent_label for s in ledger.samples()}
    assert {k: again[k] for k in first} == first and again["new"] in (0, 1)
    eps = dict(ledger.db.execute("SELECT key, sent_epsilon FROM samples").fetchall())
    assert eps["k0000"] == 2.0 and eps["new"] == 0.1
    ledger.close()


@pytest.mark.edge
def test_an_older_ledger_gains_the_columns(tmp_path):
    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE samples (key TEXT PRIMARY KEY, label INTEGER NOT NULL, token_ids BLOB NOT NULL,
                              prior BLOB, states BLOB, round INTEGER, added REAL NOT NULL);
        INSERT INTO samples(key, label, token_ids, added) VALUES ('old', 1, x'01000000', 1.0);
    """)
    old.close()
    ledger = Ledger(path)
    (s,) = ledger.samples()
    assert (s.key, s.label, s.sent_label) == ("old", 1, None)
    assert ledger.draw_sent_labels(2, math.inf, np.random.default_rng(0)) == 1
    assert ledger.samples()[0].sent_label == 1  # ε = inf: the true label
    ledger.close()
    Ledger(path).close()  # opening a migrated ledger again changes nothing


# ------------------------------------------------------------------ the board's rounds


def _board(tmp_path: Path, backbone: Path, **kw: object):
    from edge_agent.model import LocalModel
    from edge_agent.rounds import Rounds
    from schemas import HyperParams
    from tests.loop_helpers import TASK_TOML

    task = tmp_path / "task.toml"
    task.write_text(TASK_TOML)
    settings = EdgeSettings(device_id="board-1", state_dir=tmp_path / "state", backbone_dir=backbone,  # type: ignore[arg-type]
                            task_file=task, out_dim=4, taps=[1, 2, 3, 4], max_length=32,
                            hyper=HyperParams(epochs=1), **{"train_on": "server", **kw})
    model = LocalModel(settings)
    ledger = Ledger(model.state_dir / "state.db")
    sent: list[tuple[str, bytes, bool]] = []
    rounds = Rounds(settings, model, ledger, lambda items, rnd: sent.extend(items), pet=lambda: None,
                    stopping=threading.Event())
    return model, ledger, rounds, sent


def _add(model, ledger, samples) -> None:
    from edge_agent.keys import sample_key

    toks = model.fx.token_ids([s["text"] for s in samples])
    ledger.add_samples([(sample_key(model.secret.key, model.backbone.fingerprint, model.backbone.pivot, t),
                         model.task.label_index(s["label"]), t) for s, t in zip(samples, toks)])


def _job(sent):
    from schemas import Job, decode

    jobs = [decode(t, p) for t, p, _ in sent if t.endswith("/jobs")]
    assert isinstance(jobs[-1], Job)
    return jobs[-1]


@pytest.mark.edge
def test_every_round_resends_the_same_noisy_label_and_the_residual_uses_it(tmp_path, tiny_backbone):
    from tests.loop_helpers import make_samples

    model, ledger, rounds, sent = _board(tmp_path, tiny_backbone)  # label_epsilon: the default, 2
    _add(model, ledger, make_samples(300, seed=1))
    assert rounds.start() == 1
    job1 = _job(sent)
    bias = model.prior_bias
    assert bias is not None and (model.state_dir / "calibration.json").exists()
    ledger.assign_round(list(job1.keys), 1)
    ledger.update_round(1, state="done")
    rounds.current = None
    _add(model, ledger, make_samples(50, seed=2))
    assert rounds.start() == 2
    job2 = _job(sent)
    assert np.array_equal(model.prior_bias, bias)  # fitted once: every adapter is added to the same prior
    assert set(job1.keys) < set(job2.keys) and len(job2.keys) == len(set(job2.keys))

    by_key = ledger.samples_by_key(list(job2.keys))
    m = model.secret.mixing(2)
    reported = {}
    for job in (job1, job2):
        residual = job.targets.to_array().astype(np.float64) @ m  # Mᵀ·t = onehot(z) − p_cal
        prior = model.calibrated(np.stack([by_key[k].prior for k in job.keys]))
        z = (residual + prior).round()
        assert np.allclose(residual + prior, z, atol=1e-5) and set(np.unique(z.sum(1))) == {1.0}
        for k, row in zip(job.keys, z.argmax(1)):
            assert row == by_key[k].sent_label
            assert reported.setdefault(k, int(row)) == row  # round 2 reports what round 1 did
    true = np.array([by_key[k].label for k in job2.keys])
    noisy = np.array([reported[k] for k in job2.keys])
    flip = float(np.mean(true != noisy))
    assert 0.02 < flip < 0.25, flip  # e^2/(1+e^2): 11.9 % flipped, not zero, not more than a few σ away
    ledger.close()


@pytest.mark.edge
def test_label_epsilon_inf_sends_the_true_labels(tmp_path, tiny_backbone):
    from tests.loop_helpers import make_samples

    model, ledger, rounds, sent = _board(tmp_path, tiny_backbone, label_epsilon=math.inf)
    _add(model, ledger, make_samples(60, seed=3))
    rounds.start()
    job = _job(sent)
    by_key = ledger.samples_by_key(list(job.keys))
    residual = job.targets.to_array().astype(np.float64) @ model.secret.mixing(2)
    prior = np.stack([by_key[k].prior for k in job.keys])
    assert ((residual + prior).argmax(1) == [by_key[k].label for k in job.keys]).all()
    ledger.close()


def test_the_prediction_keeps_its_meaning_under_label_dp():
    """Trained on randomised labels, ``p_b + Mᵀ·g`` estimates E[onehot(z) | x] = a·P(y | x) + q with
    a = keep − (1 − keep)/(C − 1) > 0: the same argmax as the clear posterior's. The server's trainer
    and the board's forward pass, on features where one direction decides the label."""
    from edge_agent.secret import DeviceSecret
    from schemas import HyperParams, SideNetSpec
    from schemas.sidenet import SideNetForward
    from side_server.trainer import train

    rng = np.random.default_rng(5)
    n, states, width = 3000, 3, 16
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, states, width)).astype(np.float32)
    x[:, :, 0] += np.where(y == 1, 1.5, -1.5)[:, None]
    prior = np.full((n, 2), 0.5, np.float32)
    spec = SideNetSpec(num_states=states, width=width, taps=(1, 2), bottleneck=4, out_dim=4)
    hyper = HyperParams(epochs=8, lr=3e-3, batch_size=64)
    tr, te = np.arange(2000), np.arange(2000, n)
    secret = DeviceSecret.generate(4, rng)
    preds = {}
    for eps in (math.inf, 2.0):
        z = randomize(y[tr], 2, eps, rng)
        net, _ = train(spec, hyper, x[tr][:, list(spec.taps)], secret.targets(z, prior[tr], 0.1, rng))
        g = SideNetForward.from_bytes(spec, net.to_weights())(x[te])
        preds[eps] = (prior[te] + secret.unmix(g, 2)).argmax(1)
    clear, dp = (float(np.mean(preds[e] == y[te])) for e in (math.inf, 2.0))
    assert clear > 0.9 and dp > clear - 0.03, (clear, dp)
    assert np.mean(preds[math.inf] == preds[2.0]) > 0.95


@pytest.mark.edge
def test_the_agent_says_at_start_what_its_privacy_setting_lets_leave_the_board(tmp_path):
    from edge_agent.agent import privacy_summary

    base = dict(device_id="b-1", state_dir=tmp_path, backbone_dir=tmp_path, task_file=tmp_path / "t.toml")
    assert "no job, target or activation leaves it" in privacy_summary(EdgeSettings(**base), 2)  # the default
    server = privacy_summary(EdgeSettings(**base, train_on="server"), 7)
    assert "ε = 2 keeps a label with probability 0.552 for 7 classes (45% of the labels sent are wrong" in server
    assert "probability 0.881 for 2 classes" in privacy_summary(EdgeSettings(**base, train_on="server"), 2)
    assert "no label-DP" in privacy_summary(EdgeSettings(**base, train_on="server", label_epsilon=math.inf), 2)
    fed = privacy_summary(EdgeSettings(**base, cohort="line", cohort_secret_file=tmp_path / "c.json"), 7)
    assert "federated member of cohort line: only changes of the side network's weights" in fed
    pooled = privacy_summary(EdgeSettings(**base, cohort="line", pool="activations"), 5)
    assert pooled.startswith("pooled in cohort line: label-DP at ε = 2 keeps a label with probability 0.649")
