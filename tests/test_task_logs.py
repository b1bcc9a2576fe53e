"""What the agent says about the task's texts and itself: texts cut at max_length (once per inbox
file, not per text), the label-DP setting of a job as it is, and its stop."""

from __future__ import annotations

import logging

import pytest

from edge_agent.agent import EdgeAgent
from tests.loop_helpers import AgentThread, edge_settings, make_samples, wait_for, write_jsonl


@pytest.mark.integration
def test_cut_texts_label_dp_off_and_stop_are_logged(
    tmp_path, tiny_backbone, mosquitto, device_account, caplog
):
    caplog.set_level(logging.INFO)
    dev, pw = device_account
    # "Review : " + text after <s>: max_length 12 leaves 11 tokens, so 10 words or more are cut
    settings = edge_settings(
        tmp_path, tiny_backbone, mosquitto, dev, pw, max_length=12, label_epsilon=float("inf")
    )
    rows = make_samples(20, seed=3)
    for r in rows[:3]:
        r["text"] = " ".join(["really"] * 12) + " " + r["text"]
    agent = EdgeAgent(settings)
    with AgentThread(agent):
        write_jsonl(agent.inbox / "a.jsonl", rows)
        wait_for(lambda: agent.ledger.count_new() == 20, 30, "the inbox to be read")
        (agent.state_dir / "train.request").touch()
        wait_for(
            lambda: agent.ledger.open_round() is not None and "round 1: job" in caplog.text,
            60,
            "the round's job",
        )
    said = [r.getMessage() for r in caplog.records]
    cut = [m for m in said if "texts were cut" in m]
    assert cut == [
        "inbox: a.jsonl: 3 of 20 texts were cut to max_length 12: their prompt is longer "
        "than 11 tokens (the longest 20); the last 11 were kept (`sidetune task check "
        "--texts` counts them; raise max_length in edge.toml to keep more)"
    ]
    job = next(m for m in said if "round 1: job" in m)
    assert "labels sent as they are: label_epsilon = inf" in job and "randomis" not in job
    stopping = [m for m in said if "stopping (asked to)" in m]
    assert len(stopping) == 1 and "round 1 resumes then" in stopping[0]
    assert said[-1] == f"edge agent {dev} stopped"


def test_a_finite_epsilon_says_how_many_labels_went_through_randomised_response(
    tmp_path, tiny_backbone, caplog
):
    """Without a broker (the job waits in the outbox): the job's line at ε = 2."""
    from sidetune.services import Mosquitto

    caplog.set_level(logging.INFO)
    nowhere = Mosquitto(tmp_path / "none", {}, port=1)  # never started: the agent only queues
    settings = edge_settings(
        tmp_path, tiny_backbone, nowhere, "dev-solo", "pw-not-used-1234", label_epsilon=2.0
    )
    agent = EdgeAgent(settings, connect=False)
    try:
        write_jsonl(agent.inbox / "a.jsonl", make_samples(12, seed=4))
        agent.step(wait=0)
        assert agent.rounds.start() == 1
    finally:
        agent.ledger.close()
    job = next(r.getMessage() for r in caplog.records if "round 1: job" in r.getMessage())
    assert "12 new labels through randomised response at ε=2" in job
    assert not [r for r in caplog.records if "texts were cut" in r.getMessage()]
