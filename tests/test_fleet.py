"""The fleet's records (side_server/fleet.py) and ``sidetune fleet`` after a real round: real
mosquitto, Redis, an agent on the tiny backbone that reports its round in its status."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from edge_agent.agent import EdgeAgent
from schemas import HyperParams
from side_server import fleet
from side_server.fleet import FleetLog, device_detail, fleet_snapshot, job_detail
from sidetune.cli import main
from sidetune.services import SERVER_USER, RedisServer, free_port
from tests.loop_helpers import (
    AgentThread,
    clear_device,
    edge_settings,
    make_batch,
    make_job,
    make_samples,
    request_round,
    round_state,
    server_settings,
    start_worker,
    wait_for,
    write_jsonl,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 8
SAMPLES = 200


def write_config(path: Path, redis_url: str) -> Path:
    path.write_text(f'redis_url = "{redis_url}"\n')
    return path


def test_fleet_after_a_real_round(tmp_path, tiny_backbone, mosquitto, redis_url, broker_accounts, device_account,
                                  mqtt_client, capsys):
    device, password = device_account
    wid = f"fleet-{uuid.uuid4().hex[:8]}"
    clear_device(mqtt_client, device)  # no retained adapter of an earlier test on this account
    worker = start_worker(server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER], worker_id=wid,
                                          share_group=wid))
    holdout = write_jsonl(tmp_path / "holdout.jsonl", make_samples(60, seed=99))
    settings = edge_settings(tmp_path, tiny_backbone, mosquitto, device, password, holdout_file=holdout,
                             hyper=HyperParams(epochs=EPOCHS, lr=3e-3, batch_size=32))
    r = redis.Redis.from_url(redis_url)
    try:
        with AgentThread(EdgeAgent(settings)) as agent:
            request_round(agent, make_samples(SAMPLES, seed=1))
            r1 = wait_for(lambda: round_state(agent, 1), 120, "round 1")
            assert isinstance(r1, dict) and r1["state"] == "done", r1
            fingerprint = agent.backbone.fingerprint
            # the board announces its round in its status once the adapter is installed
            wait_for(lambda: (d := device_detail(r, device)) and d["last_round"], 30, "the round in the status")
            # a message the server rejects, from the device's account
            raw = mqtt_client(device, password)
            stray = make_batch(make_job(device, n=2))
            from schemas import encode

            raw.publish(*encode(stray), qos=1).wait_for_publish(5)
            wait_for(lambda: (d := device_detail(r, device)) and d["rejections"], 30, "the rejection recorded")
            snap = fleet_snapshot(r)
        # the agent stopped: its "offline" status (published on the way out) reaches the fleet's records
        wait_for(lambda: (d := device_detail(r, device)) and d["online"] is False, 30, "the device offline")
    finally:
        worker.stop()
        clear_device(mqtt_client, device, [wid])  # the round's retained adapter, the worker's session
    gone = device_detail(r, device)
    assert gone is not None and gone["adapter_version"] == 1 and gone["last_round"] is not None
    [dev] = [d for d in snap["devices"] if d["device"] == device]
    assert dev["online"] is True
    assert dev["agent_version"] and dev["backbone_fingerprint"] == fingerprint
    assert dev["adapter_version"] == 1
    assert dev["last_seen"] and time.time() - dev["last_seen"] < 120
    rd = dev["last_round"]
    assert rd == dev["rounds"][-1] and len(dev["rounds"]) == 1
    assert (rd["round"], rd["samples"], rd["forward_passes"], rd["adapter_version"]) == (1, SAMPLES, SAMPLES, 1)
    assert (rd["bytes_up"], rd["bytes_down"]) == (r1["bytes_up"], r1["bytes_down"])
    assert rd["holdout_accuracy"] == pytest.approx(r1["tuned_accuracy"]) and 0 <= rd["holdout_accuracy"] <= 1
    assert rd["seconds"] == pytest.approx(r1["seconds"])
    [job] = dev["jobs"]
    assert job["job_id"] == r1["job_id"] and job["state"] == "done"
    assert (job["samples"], job["epochs"], job["epochs_done"], job["adapter_version"]) == (SAMPLES, EPOCHS, EPOCHS, 1)
    assert [x["epoch"] for x in job["losses"]] == list(range(1, EPOCHS + 1))  # one point per finished epoch
    assert all(x["train_loss"] > 0 and x["val_loss"] is not None for x in job["losses"])
    assert job["created_at"] <= job["finished_at"]
    assert job in snap["jobs"]
    assert job_detail(r, device, job["job_id"]) == job
    assert dev["cache_samples"] == SAMPLES and dev["cache_bytes"] > 0
    assert dev["quota"]["cache_bytes"] == {"used": dev["cache_bytes"], "limit": 256 * 1024 * 1024}
    assert dev["quota"]["jobs_in_flight"] == {"used": 0, "limit": 16}
    assert dev["rejections"] == {"unknown_job": 1}
    [rej] = dev["last_rejections"]
    assert rej["code"] == "unknown_job" and stray.job_id in rej["reason"]
    assert any(x["code"] == "unknown_job" and x["count"] >= 1 for x in snap["rejections_over_time"])
    # cluster-ready keys: every record of the device is tagged with it, and every fleet key expires
    for k in r.scan_iter(match="sidetune:fleet:*"):
        name = k.decode()
        if device in name:
            assert f"{{{device}}}" in name, name
        assert r.ttl(k) > 0, name

    # ------------------------------------------------ sidetune fleet
    cfg = write_config(tmp_path / "server.toml", redis_url)
    assert main(["fleet", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith(device + " "))
    assert " offline " in line and fingerprint[:12] in line and " v1 " in line
    assert f"#1: {SAMPLES} samples, {SAMPLES} fwd" in line and f"acc {rd['holdout_accuracy']:.3f}" in line
    assert "1 done" in line
    assert f"{device}: rejected" in out and "(unknown_job)" in out

    assert main(["fleet", "--config", str(cfg), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"generated_at", "devices", "jobs", "rejections_over_time"}
    [pdev] = [d for d in printed["devices"] if d["device"] == device]
    assert pdev == gone

    assert main(["fleet", "jobs", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert any(job["job_id"] in x and " done " in x and f"{EPOCHS}/{EPOCHS}" in x for x in out.splitlines())
    assert main(["fleet", "--config", str(cfg), "jobs", "--json"]) == 0
    assert job in json.loads(capsys.readouterr().out)

    assert main(["fleet", "device", device, "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"device {device}: offline" in out and f"losses of {job['job_id']}" in out
    assert "rejections: unknown_job 1" in out
    assert main(["fleet", "device", device, "--config", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rounds"] == dev["rounds"]
    assert main(["fleet", "device", "dev-never-seen", "--config", str(cfg)]) == 2
    assert "no device 'dev-never-seen'" in capsys.readouterr().err


def test_fleet_command_errors(tmp_path, redis_server, redis_url):
    good = redis_url
    wrong = good.replace(f":{redis_server.password}@", ":not-the-password@")
    nobody = f"redis://:x@127.0.0.1:{free_port()}/0"
    for url, code, words in ((wrong, 78, "refused the password"), (nobody, 69, "unreachable")):
        cfg = write_config(tmp_path / f"{code}.toml", url)
        p = subprocess.run([sys.executable, "-m", "sidetune.cli", "fleet", "--config", str(cfg)], capture_output=True,
                           text=True, timeout=60, cwd=ROOT)
        assert p.returncode == code, p
        assert p.stderr.startswith("sidetune: error: ") and words in p.stderr and "Traceback" not in p.stderr
        assert "not-the-password" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    cfg = write_config(tmp_path / "ok.toml", good)
    p = subprocess.run([sys.executable, "-m", "sidetune.cli", "fleet", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0 and "no device has been heard of yet" in p.stdout, p


def test_fleet_records_are_bounded(redis_url):
    r = redis.Redis.from_url(redis_url)
    log = FleetLog(r)
    for n in range(1, fleet.ROUNDS_KEPT + 11):
        for _ in range(2):  # each status repeats the last round: kept once
            log.status("dev-x", "online", "0.1", n, "ab" * 32, time.time(),
                       {"round": n, "samples": n, "holdout_accuracy": 0.5, "adapter_version": n})
    for i in range(fleet.LAST_REJECTIONS + 5):
        log.rejection("dev-x", "invalid", f"bad {i}")
    log.rejection("dev-x", "quota_rate", "too fast", count=7)  # dropped ones counted with the next answered one
    for i in range(fleet.DEVICE_JOBS_KEPT + 3):
        log.job("dev-x", f"j{i}", samples=1, epochs=1, created_at=1000.0 + i)
    log.epoch("dev-x", "j52", 1, 0.5, 0.6)
    log.epoch("dev-x", "j52", 1, 0.4, 0.6)  # the same epoch again (trained again after a crash): one point
    d = device_detail(r, "dev-x")
    assert d is not None
    assert [x["round"] for x in d["rounds"]] == list(range(11, fleet.ROUNDS_KEPT + 11))
    assert d["last_round"]["round"] == fleet.ROUNDS_KEPT + 10
    assert len(d["last_rejections"]) == fleet.LAST_REJECTIONS
    assert d["last_rejections"][0]["code"] == "quota_rate" and d["last_rejections"][1]["reason"] == "bad 24"
    assert d["rejections"] == {"invalid": fleet.LAST_REJECTIONS + 5, "quota_rate": 7}
    assert len(d["jobs"]) == fleet.DEVICE_JOBS_KEPT and d["jobs"][0]["job_id"] == "j52"  # newest first
    assert [x["epoch"] for x in d["jobs"][0]["losses"]] == [1] and d["jobs"][0]["epochs_done"] == 1
    over = {x["code"]: x["count"] for x in fleet_snapshot(r)["rejections_over_time"]}
    assert over == {"invalid": fleet.LAST_REJECTIONS + 5, "quota_rate": 7}
    assert all(r.ttl(k) > 0 for k in r.scan_iter(match="sidetune:fleet:*"))
    assert device_detail(r, "dev-y") is None and job_detail(r, "dev-x", "nope") is None


def test_fleet_writes_never_raise(tmp_path):
    """Redis away: the worker's fleet writes are dropped, not raised (they are for people to look at)."""
    rs = RedisServer(tmp_path / "redis").start()
    r = redis.Redis.from_url(rs.url, socket_timeout=2)
    rs.stop()
    log = FleetLog(r)
    log.status("dev-x", "online", "0.1", 1, None, time.time(), {"round": 1})
    log.job("dev-x", "j", samples=1, epochs=1)
    log.epoch("dev-x", "j", 1, 0.5, None)
    log.job_state("dev-x", "j", "done")
    log.rejection("dev-x", "invalid", "x")
    assert log.created_at("dev-x", "j") is None
