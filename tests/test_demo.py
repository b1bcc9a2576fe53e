"""What `sidetune demo` runs: its task and its data shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from sidetune.data import DataError, Review, shards
from sidetune.demo import TASK

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_runs_the_task_the_deploy_example_ships():
    """deploy/task.example.toml documents the demo's prompt: the two must not drift apart."""
    assert tomllib.loads(TASK) == tomllib.loads((ROOT / "deploy" / "task.example.toml").read_text())


def test_shards_are_disjoint_and_sized():
    reviews = [Review(f"review {i}", "fresh" if i % 2 else "rotten") for i in range(100)]
    parts = shards(reviews, devices=3, train=20, holdout=10, seed=1)
    assert [(len(tr), len(ho)) for tr, ho in parts] == [(20, 10)] * 3
    seen = [r.text for tr, ho in parts for r in tr + ho]
    assert len(seen) == len(set(seen)) == 90
    assert parts == shards(reviews, devices=3, train=20, holdout=10, seed=1)
    with pytest.raises(DataError, match="101 reviews"):
        shards(reviews, devices=1, train=100, holdout=1)


@pytest.mark.integration
def test_demo_keep_running_leaves_the_fleet_up_then_stops_it_all(tmp_path, tiny_backbone):
    """`sidetune demo --keep-running` on the tiny backbone: the dashboard's URL is printed, after the
    rounds `sidetune fleet --json` and the dashboard show both boards with adapter v2 and the
    accuracy each reported, the worker's metrics answer; SIGTERM stops everything, exit 0."""
    import json
    import re
    import signal
    import subprocess
    import sys
    import threading
    import time
    import urllib.request

    from edge_agent.config import EdgeSettings

    work = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidetune.cli", "demo", "--backbone", str(tiny_backbone), "--samples", "40",
         "--holdout", "20", "--epochs", "3", "--workdir", str(work), "--json", str(tmp_path / "demo.json"),
         "--keep-running"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any("everything keeps running" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        out = "".join(lines)
        dash = re.search(r"^\[demo\] dashboard: (http://127\.0\.0\.1:\d+/)", out, re.M)
        metrics = re.search(r"^\[demo\] worker metrics: (http://127\.0\.0\.1:\d+/metrics)", out, re.M)
        assert dash and metrics, out
        assert f"metrics_port = {metrics.group(1).split(':')[2].split('/')[0]}" in (work / "server.toml").read_text()

        report = {d["device_id"]: d["rounds"][-1] for d in json.loads((tmp_path / "demo.json").read_text())["devices"]}
        versions = 2 * EdgeSettings.model_fields["federated_rounds"].default
        fleet = subprocess.run([sys.executable, "-m", "sidetune.cli", "fleet", "--config", str(work / "server.toml"),
                                "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert fleet.returncode == 0, fleet.stderr
        with urllib.request.urlopen(dash.group(1) + "api/fleet", timeout=10) as resp:
            shown = json.loads(resp.read())
        for snap in (json.loads(fleet.stdout), shown):
            devices = {d["device"]: d for d in snap["devices"]}
            assert set(devices) == {"board-1", "board-2"}
            for dev, last in report.items():
                # two rounds of the cohort, each of federated_rounds FedAvg rounds: one version each
                assert devices[dev]["online"] and devices[dev]["adapter_version"] == versions == last["adapter_version"]
                assert devices[dev]["last_round"]["holdout_accuracy"] == pytest.approx(last["tuned_accuracy"])
        with urllib.request.urlopen(metrics.group(1), timeout=10) as resp:
            assert resp.status == 200
        # the two boards are one cohort: each adapter was trained on both boards' samples
        for dev in ("board-1", "board-2"):
            assert f"[demo] {dev}: adapter v{versions} of cohort demo, trained on 80 samples of 2 boards" in out, out
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        reader.join(10)
    assert rc == 0, "".join(lines)
    assert "[demo] stopping" in "".join(lines)
    for url in (dash.group(1), metrics.group(1)):  # everything it started is gone
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=2)
