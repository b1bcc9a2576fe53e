"""`sidetune bench fleet` end to end on the tiny llama: a few boards with accounts of their own
(broker init + add-device), a real mosquitto, Redis and `sidetune server` process; the JSON has
exactly the issue's fields and says every job completed with nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
FIELDS = ["boards", "samples", "workers", "cluster", "jobs_completed", "jobs_failed", "samples_lost",
          "ingest_samples_per_s", "time_to_adapter_s", "worker_rss_mb_max", "redis_used_mb", "broker_rss_mb_max"]


def test_bench_fleet_on_the_tiny_backbone(tmp_path, tiny_backbone):
    out = tmp_path / "fleet.json"
    env = {"SIDETUNE_HOME": str(tmp_path / "home"), "PATH": "/usr/sbin:/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "sidetune.cli", "bench", "fleet", "--boards", "3", "--samples", "40",
                           "--workers", "1", "--backbone", str(tiny_backbone), "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert list(res) == FIELDS
    assert list(res["time_to_adapter_s"]) == ["p50", "p99", "max"]
    assert (res["boards"], res["samples"], res["workers"], res["cluster"]) == (3, 40, 1, False)
    assert (res["jobs_completed"], res["jobs_failed"], res["samples_lost"]) == (3, 0, 0), proc.stdout[-3000:]
    assert res["ingest_samples_per_s"] > 0 and 0 < res["time_to_adapter_s"]["p50"] <= res["time_to_adapter_s"]["max"]
    assert res["worker_rss_mb_max"] > 50 and res["broker_rss_mb_max"] > 1 and res["redis_used_mb"] > 0.1
    assert "samples cached" in proc.stdout and "CPU: workers" in proc.stdout  # progress, and the table
    assert f"backbone {tiny_backbone.name} (4 layers" in proc.stdout  # which backbone, said
