"""A worker's /metrics and /healthz (side_server/metrics.py) on a real round: real mosquitto, Redis,
an agent on the tiny backbone. The counters must equal what the round implies."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.agent import EdgeAgent
from schemas import HyperParams
from sidetune.services import SERVER_USER, free_port
from tests.loop_helpers import (
    AgentThread,
    ServerProcess,
    clear_device,
    edge_settings,
    make_samples,
    request_round,
    round_state,
    server_settings,
    start_worker,
    wait_for,
)

pytestmark = pytest.mark.integration

SAMPLES = 300
UPLOAD_BATCH = 32
EPOCHS = 40


def get(url: str, timeout: float = 15.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port: int) -> dict[str, float]:
    """``name{label=value,...}`` -> value of every sample on the worker's /metrics."""
    code, text = get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200, text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_metrics_during_and_after_a_real_round(tmp_path, tiny_backbone, mosquitto, redis_url, broker_accounts,
                                               device_account, mqtt_client):
    device, password = device_account
    port = free_port()
    wid = f"metrics-{uuid.uuid4().hex[:8]}"
    clear_device(mqtt_client, device)  # no retained adapter of an earlier test on this account
    worker = start_worker(server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER], worker_id=wid,
                                          share_group=wid, metrics_port=port))
    edge_port = free_port()
    settings = edge_settings(tmp_path, tiny_backbone, mosquitto, device, password, upload_batch=UPLOAD_BATCH,
                             hyper=HyperParams(epochs=EPOCHS, lr=3e-3, batch_size=32), metrics_port=edge_port)
    try:
        before = scrape(port)
        assert before["sidetune_broker_connected"] == 1 and before["sidetune_redis_up"] == 1
        assert before.get("sidetune_jobs_total{state=waiting}", 0) == 0
        with AgentThread(EdgeAgent(settings)) as agent:
            request_round(agent, make_samples(SAMPLES, seed=1))
            # during: the job trains (its loss is on the gauge); every upload has arrived
            during = wait_for(lambda: (m := scrape(port)).get(f"sidetune_training_epoch{{device={device}}}") and m,
                              120, "a scrape while the job trains", poll=0.05)
            assert isinstance(during, dict)
            batches = math.ceil(SAMPLES / UPLOAD_BATCH)
            assert during["sidetune_messages_received_total{kind=jobs}"] == 1
            assert during["sidetune_messages_received_total{kind=activations}"] == batches
            assert during["sidetune_samples_cached_total"] == SAMPLES
            assert during["sidetune_cache_misses_total"] == SAMPLES and during["sidetune_cache_hits_total"] == 0
            assert during["sidetune_jobs_total{state=waiting}"] == 1
            assert during.get("sidetune_jobs_total{state=done}", 0) == 0
            assert during["sidetune_jobs{state=training}"] == 1
            assert 1 <= during["sidetune_epochs_trained_total"] < EPOCHS
            assert during[f"sidetune_training_loss{{device={device}}}"] > 0
            assert during["sidetune_messages_sent_total{kind=cache}"] == 1
            assert during[f"sidetune_cached_samples{{device={device}}}"] == SAMPLES
            assert during[f"sidetune_cached_bytes{{device={device}}}"] > SAMPLES * 2 * agent.spec.num_states * agent.spec.width

            r1 = wait_for(lambda: round_state(agent, 1), 180, "round 1")
            assert isinstance(r1, dict) and r1["state"] == "done", r1
            # the board's "online" status after its round reaches the worker too
            after = wait_for(lambda: (m := scrape(port)).get("sidetune_messages_received_total{kind=status}", 0) >= 2
                             and m, 30, "the board's status after the round")
            # the board's own metrics, on its loopback port
            board = wait_for(lambda: (m := scrape(edge_port)).get("sidetune_edge_rounds_total{state=done}") and m,
                             30, "the board's metrics after its round")
            assert isinstance(board, dict)
            assert board["sidetune_edge_forward_passes_total"] == SAMPLES
            assert board["sidetune_edge_forward_passes_per_second"] > 0
            assert board["sidetune_edge_adapter_version"] == 1 and board["sidetune_edge_connected"] == 1
        assert isinstance(after, dict)
        assert after["sidetune_jobs_total{state=done}"] == 1
        assert after.get("sidetune_jobs_total{state=failed}", 0) == 0
        assert after["sidetune_epochs_trained_total"] == EPOCHS
        assert after["sidetune_job_duration_seconds_count"] == 1
        assert 0 < after["sidetune_job_duration_seconds_sum"] < 180
        assert after["sidetune_training_seconds_total"] > 0
        assert not any(k.startswith("sidetune_training_loss{") for k in after)  # nothing trains now
        assert after["sidetune_jobs{state=training}"] == 0 and after["sidetune_jobs{state=waiting}"] == 0
        assert after["sidetune_messages_received_total{kind=activations}"] == batches
        assert after["sidetune_messages_sent_total{kind=adapter}"] == 1
        # progress: one per upload batch, one per epoch, and "done"
        assert after["sidetune_messages_sent_total{kind=progress}"] == batches + EPOCHS + 1
        assert not any(k.startswith("sidetune_rejections_total") for k in after)
        # bytes: what the board counted for its round, message for message
        up = after["sidetune_message_bytes_received_total{kind=jobs}"] + \
            after["sidetune_message_bytes_received_total{kind=activations}"]
        assert up == r1["bytes_up"]
        down = sum(after[f"sidetune_message_bytes_sent_total{{kind={k}}}"] for k in ("cache", "progress", "adapter"))
        # the board stops counting when its adapter is installed: the "done" progress after it is not its round's
        assert 0 < down - r1["bytes_down"] < 1000, (down, r1["bytes_down"])
    finally:
        worker.stop()
        clear_device(mqtt_client, device, [wid])  # the round's retained adapter, the worker's session
    with pytest.raises(OSError):
        get(f"http://127.0.0.1:{port}/metrics", timeout=2)  # stopped with its worker
    with pytest.raises(OSError):
        get(f"http://127.0.0.1:{edge_port}/metrics", timeout=2)  # ... and the board's with its agent
    # the board's textfile (written as the agent stopped), what node_exporter would ship
    prom = (settings.state_dir / "metrics.prom").read_text()
    board_file = {f"{s.name}{s.labels or ''}": s.value for fam in text_string_to_metric_families(prom)
                  for s in fam.samples}
    assert board_file["sidetune_edge_rounds_total{'state': 'done'}"] == 1
    assert board_file["sidetune_edge_bytes_up_total"] == r1["bytes_up"]
    assert board_file["sidetune_edge_bytes_down_total"] == r1["bytes_down"]
    assert board_file["sidetune_edge_outbox_messages"] == 0 and board_file["sidetune_edge_connected"] == 0


def test_healthz_follows_redis(mosquitto, redis_server, redis_url, broker_accounts):
    port = free_port()
    wid = f"health-{uuid.uuid4().hex[:8]}"
    worker = start_worker(server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER], worker_id=wid,
                                          share_group=wid, metrics_port=port))
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        code, body = get(url)
        assert code == 200, body
        ok = json.loads(body)
        assert ok.pop("inbox") >= 0  # retained statuses of every device may be waiting
        assert ok == {"status": "ok", "worker": wid, "broker": True, "redis": True}
        redis_server.stop()
        code, body = get(url)
        assert code == 503, body
        bad = json.loads(body)
        assert bad["status"] == "unhealthy" and bad["redis"] is False and bad["broker"] is True
        assert bad["reason"].startswith("redis unreachable")
        assert scrape(port)["sidetune_redis_up"] == 0
        assert get(f"http://127.0.0.1:{port}/nothing")[0] == 404
        redis_server.start()  # same port, same password
        wait_for(lambda: get(url)[0] == 200, 30, "/healthz to answer 200 again")
        assert scrape(port)["sidetune_redis_up"] == 1
    finally:
        if redis_server.proc is None or redis_server.proc.poll() is not None:
            redis_server.start()
        worker.stop()


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_server_process_serves_healthz_and_logs_json(tmp_path, mosquitto, redis_url, broker_accounts):
    port = free_port()
    wid = f"proc-{uuid.uuid4().hex[:8]}"
    settings = server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER], worker_id=wid, share_group=wid,
                               metrics_port=port, log_format="json")
    proc = ServerProcess(settings, tmp_path / "server")
    try:
        def healthy() -> bool:
            try:
                return get(f"http://127.0.0.1:{port}/healthz", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(healthy, 60, "the server process's /healthz", poll=0.2)
        assert scrape(port)["sidetune_broker_connected"] == 1
    finally:
        proc.stop()
    lines = _json_lines(proc.log.read_text())
    assert lines, "no log lines"
    assert all(set(x) >= {"time", "level", "logger", "message", "device", "job"} for x in lines)
    up = [x for x in lines if x["message"].startswith(f"worker {wid} up")]
    assert up and f"metrics on http://127.0.0.1:{port}/metrics" in up[0]["message"]
    assert settings.redis_url.split("@")[0].split(":")[-1] not in up[0]["message"]  # no Redis password in the log
    assert all(x["time"].endswith("Z") for x in lines)
