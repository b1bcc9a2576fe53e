"""``wire_states = "taps"``: the board sends only the pivot states its side network reads (the spec's
``states``), the server caches and trains on exactly those rows, and the sample keys bind which rows."""

from __future__ import annotations

import pytest

from edge_agent.agent import EdgeAgent
from edge_agent.keys import sample_key
from schemas.spec import SideNetSpec
from sidetune.services import SERVER_USER
from tests.loop_helpers import (
    AgentThread,
    edge_settings,
    make_samples,
    request_round,
    round_state,
    server_settings,
    start_worker,
    wait_for,
    write_jsonl,
)


def test_rows_that_travel_and_where_the_taps_sit_among_them():
    all_ = SideNetSpec(num_states=31, width=576, taps=(3, 6, 30), out_dim=8)
    taps = all_.model_copy(update={"states": "taps"})
    assert all_.wire_rows == tuple(range(31)) and all_.tap_rows == (3, 6, 30)
    assert taps.wire_rows == (3, 6, 30) and taps.tap_rows == (0, 1, 2)
    assert all_.key_scope("last") == "last"
    assert taps.key_scope("last") == "last/rows=3,6,30"
    other = taps.model_copy(update={"taps": (3, 6, 27)})
    keys = {sample_key(b"s", "ab" * 32, s.key_scope("last"), [1, 2, 3]) for s in (all_, taps, other)}
    assert len(keys) == 3  # a sample cached under one set of rows is never read back under another


@pytest.mark.integration
def test_a_round_sending_only_the_tapped_states(tmp_path, tiny_backbone, mosquitto, redis_url, broker_accounts,
                                                device_account):
    device, password = device_account
    holdout = write_jsonl(tmp_path / "holdout.jsonl", make_samples(200, seed=99))
    settings = edge_settings(tmp_path, tiny_backbone, mosquitto, device, password, holdout_file=holdout,
                             taps=[2, 4], wire_states="taps",
                             label_epsilon=float("inf"))  # which rows travel, not label-DP: no label noise
    worker = start_worker(server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER]))
    try:
        with AgentThread(EdgeAgent(settings)) as agent:
            assert agent.spec.states == "taps" and agent.spec.wire_rows == (2, 4)
            request_round(agent, make_samples(300, seed=1))
            r1 = wait_for(lambda: round_state(agent, 1), 120, "round 1")
            assert r1["state"] == "done", r1
            assert r1["tuned_accuracy"] > r1["zero_shot_accuracy"] + 0.1, r1  # trained on the right rows
            # Per sample: the two tapped fp16 rows + the job's float32 target + its key twice, 10 % headers.
            floor = 2 * agent.spec.width * 2 + 4 * agent.spec.out_dim + 2 * 67
            assert r1["bytes_up"] / 300 <= 1.1 * floor, (r1["bytes_up"] / 300, floor)
            # a second round reuses the cached rows: only the new samples run and travel
            request_round(agent, make_samples(100, seed=2), "b.jsonl", "the second file")
            r2 = wait_for(lambda: round_state(agent, 2), 120, "round 2")
            assert r2["state"] == "done" and r2["forward_passes"] == 100, r2
    finally:
        worker.stop()
