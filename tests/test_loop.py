"""The whole loop on a tiny model through a real mosquitto and a real Redis."""

from __future__ import annotations

import pytest

from edge_agent.agent import EdgeAgent
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

pytestmark = pytest.mark.integration


def test_two_rounds_lift_accuracy_and_reuse_the_cache(tmp_path, tiny_backbone, mosquitto, redis_url,
                                                       broker_accounts, device_account):
    device, password = device_account
    holdout = write_jsonl(tmp_path / "holdout.jsonl", make_samples(200, seed=99))
    settings = edge_settings(tmp_path, tiny_backbone, mosquitto, device, password, holdout_file=holdout)
    worker = start_worker(server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER]))
    try:
        with AgentThread(EdgeAgent(settings)) as agent:
            request_round(agent, make_samples(300, seed=1))
            r1 = wait_for(lambda: round_state(agent, 1), 120, "round 1")
            assert r1["state"] == "done", r1
            assert r1["forward_passes"] == 300 and r1["new_samples"] == 300
            assert r1["tuned_accuracy"] > r1["zero_shot_accuracy"] + 0.1, r1

            request_round(agent, make_samples(100, seed=2), "b.jsonl", "the second file")
            r2 = wait_for(lambda: round_state(agent, 2), 120, "round 2")
            assert r2["state"] == "done", r2
            assert r2["samples"] == 400 and r2["new_samples"] == 100
            assert r2["forward_passes"] == 100  # round 1's samples came from the server's cache
            assert r2["adapter_version"] == 2
            # Per sample: fp16 states + the job's float32 target + its key (hex, in the job
            # and in the batch) — and 10 % for headers, nothing more.
            floor = settings_states_bytes(agent) + 4 * agent.spec.out_dim + 2 * 67
            assert r1["bytes_up"] / 300 <= 1.1 * floor, (r1["bytes_up"] / 300, floor)
            assert r2["bytes_up"] / 100 <= 1.1 * floor + 4 * (4 * agent.spec.out_dim + 67)  # + 300 cached samples' targets
    finally:
        worker.stop()


def settings_states_bytes(agent: EdgeAgent) -> int:
    return agent.spec.num_states * agent.spec.width * 2
