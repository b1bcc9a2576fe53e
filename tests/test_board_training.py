"""Board-only training (``train_on = "board"``): the numpy trainer, and a round that sends nothing.

The trainer's gradients against torch's autograd, and a run against the server's
trainer, are in tests/test_board_gradients.py (they need torch).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from schemas import sidenet as bt
from schemas.sidenet import SideNetForward
from schemas.spec import HyperParams, SideNetSpec
from schemas.topics import topic

SPEC = SideNetSpec(num_states=5, width=16, taps=(1, 2, 4), bottleneck=4, out_dim=4)


def _task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """States whose last tap carries a noisy class direction; targets M·onehot(y) of a random orthonormal M."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    states = rng.normal(size=(n, SPEC.num_states, SPEC.width)).astype(np.float32)
    states[:, 4, 0] += np.where(y == 1, 1.5, -1.5)
    m = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))[0][:, :2]
    return states, (np.eye(2)[y] - 0.5) @ m.T, y


@pytest.mark.edge
def test_a_board_training_run_lowers_the_loss_and_learns_the_task():
    states, targets, _ = _task(400, seed=1)
    hyper = HyperParams(epochs=15, lr=3e-3, batch_size=32)
    blob, reports = bt.train(SPEC, hyper, states[:, list(SPEC.taps)], targets)
    assert len(reports) == 15
    assert reports[-1].train_loss < 0.5 * reports[0].train_loss, [r.train_loss for r in reports]
    best = min(r.val_loss or 1e9 for r in reports)
    assert best < reports[0].val_loss  # type: ignore[operator]
    # The adapter is in the server's layout and the board's forward pass reads it.
    fwd = SideNetForward.from_bytes(SPEC, blob)
    test_states, _, y = _task(300, seed=2)
    m = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))[0][:, :2]
    pred = (fwd(test_states) @ m).argmax(axis=1)
    assert (pred == y).mean() > 0.8
    # The trainer's own forward pass is the board's (schemas/sidenet.py: one forward function).
    a = bt.normalise_inputs(SPEC, test_states[:, list(SPEC.taps)])
    from schemas.weights import decode_weights

    np.testing.assert_allclose(bt.forward(SPEC, decode_weights(blob, SPEC), a), fwd(test_states), rtol=1e-4, atol=1e-5)


@pytest.mark.edge
def test_the_same_data_and_seed_train_the_same_adapter_and_a_stop_keeps_the_best_so_far():
    states, targets, _ = _task(100, seed=3)
    hyper = HyperParams(epochs=4, lr=3e-3, batch_size=16)
    tapped = states[:, list(SPEC.taps)]
    a, _ = bt.train(SPEC, hyper, tapped, targets)
    b, _ = bt.train(SPEC, hyper, tapped, targets)
    assert a == b
    _, reports = bt.train(SPEC, hyper, tapped, targets, on_epoch=lambda r: r.epoch < 2)
    assert len(reports) == 2


@pytest.mark.integration
def test_a_board_round_sends_no_job_and_no_activations_and_lifts_accuracy(tmp_path, tiny_backbone, mosquitto,
                                                                         mqtt_client, device_account):
    from edge_agent.agent import EdgeAgent
    from schemas import encode
    from sidetune.services import SERVER_USER
    from tests.loop_helpers import (
        AgentThread,
        edge_settings,
        make_samples,
        request_round,
        round_state,
        wait_for,
        write_jsonl,
    )
    from tests.test_privacy import adapter_for

    device, password = device_account
    seen: list[str] = []
    lock = threading.Lock()
    spy = mqtt_client(SERVER_USER)
    subscribed = threading.Event()

    def on_message(client: object, userdata: object, msg: object) -> None:
        with lock:
            seen.append(msg.topic)  # type: ignore[attr-defined]

    spy.on_message = on_message
    spy.on_subscribe = lambda *_: subscribed.set()
    spy.subscribe([(topic(device, "jobs"), 1), (topic(device, "activations"), 1)])
    assert subscribed.wait(5), "no SUBACK"

    holdout = write_jsonl(tmp_path / "holdout.jsonl", make_samples(200, seed=99))
    settings = edge_settings(tmp_path, tiny_backbone, mosquitto, device, password, holdout_file=holdout,
                             train_on="board")
    with AgentThread(EdgeAgent(settings)) as agent:  # no server worker runs: the round needs none
        request_round(agent, make_samples(300, seed=1))
        r1 = wait_for(lambda: round_state(agent, 1), 120, "round 1")
        assert r1["state"] == "done", r1
        assert r1["forward_passes"] == 300 and r1["new_samples"] == 300 and r1["adapter_version"] == 1
        assert r1["tuned_accuracy"] > r1["zero_shot_accuracy"] + 0.1, r1
        metrics = agent.adapter.metrics
        print(f"\nboard round 1 (tiny backbone, 300 samples, 15 epochs): forward passes "
              f"{metrics['forward_cpu_s']:.2f} CPU-s, board training {metrics['board_train_cpu_s']:.2f} CPU-s "
              f"({metrics['board_train_cpu_s'] / metrics['forward_cpu_s']:.2f}x); zero-shot "
              f"{r1['zero_shot_accuracy']:.3f}, tuned {r1['tuned_accuracy']:.3f}")

        # A second round trains on all 400 samples from the ledger's states: no forward pass again.
        request_round(agent, make_samples(100, seed=2), "b.jsonl", "the second file")
        r2 = wait_for(lambda: round_state(agent, 2), 120, "round 2")
        assert r2["state"] == "done" and r2["samples"] == 400 and r2["forward_passes"] == 100, r2
        assert r2["adapter_version"] == 2
        assert agent.ledger.outbox_size() == 0 or all(
            t.endswith("/status") for _, t, *_ in agent.ledger.outbox_after(0, 1000))
        time.sleep(1.0)  # anything queued would have reached the spy by now
        # An adapter from the server (say, retained from a server-trained round) is not installed, whatever
        # its version: a board that trains on its own runs only what it trained.
        spy.publish(*encode(adapter_for(device, agent.spec, agent.backbone.fingerprint, 99)), qos=1,
                    retain=True).wait_for_publish(5)
        time.sleep(1.5)
        assert agent.adapter is not None and agent.adapter.version == 2
    spy.publish(topic(device, "adapter"), b"", qos=1, retain=True).wait_for_publish(5)  # the pool reuses accounts
    assert r1["bytes_up"] == 0 and r2["bytes_up"] == 0, (r1, r2)
    with lock:
        assert seen == [], seen


def test_the_privacy_bench_board_training_defence_learns_and_leaves_nothing_to_attack():
    """`sidetune bench privacy`'s board_training: the task learnt as well as without defence, every attack null."""
    from sidetune.bench.accuracy import TaskFeatures
    from sidetune.bench.privacy import (
        ATTACKS,
        format_report,
        plot_svg,
        privacy_on_features,
        summarise,
    )

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 900)
    states = rng.normal(size=(900, 4, 16))
    states[:, :, 0] += np.where(labels == 0, 2.0, -2.0)[:, None]
    p0 = np.clip(rng.normal(0.85, 0.05, 900), 0.5, 0.99)
    f = TaskFeatures(states.astype(np.float16), np.stack([p0, 1 - p0], 1).astype(np.float32), labels)
    res = privacy_on_features(f, f, public=300, train=400, holdout=200, splits=2, hyper=HyperParams(epochs=5, lr=3e-3),
                              cpu_per_sample=0.01, board_training=True, progress=lambda m: None)
    out = summarise("synthetic", res)
    board, none = out["defences"]["board_training"], out["defences"]["none"]
    assert board["params"] == {"train_on": "board"}
    assert set(board["attacks"]) == set(ATTACKS) and all(v is None for v in board["attacks"].values())
    assert board["task_accuracy"] > 0.9 and abs(board["task_accuracy"] - none["task_accuracy"]) < 0.03, (board, none)
    assert board["device_cpu_s"] > 0.01 * 400
    setup = {"public": 300, "train": 400, "holdout": 200, "splits": 2, "backbone": "ab" * 32, "task": "synthetic",
             "guessed": "plain", "epochs": 5, "out_dim": 8, "noise_std": 0.1, "seconds": 1.0, "candidates": 900}
    assert "board_training (nothing sent)" in plot_svg(out)
    assert "`board_training`" in format_report(out, res, setup)
