"""`sidetune bench cohort`'s LoRA baselines on the tiny backbone: federated LoRA with the real
Flower deployment engine (a SuperLink, a SuperNode per board, `flwr run`; 2 boards, 1 round:
40-60 s here), each board alone and central LoRA, in the results' exact shape, bytes from the
messages that travelled, and every Flower process stopped afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from edge_agent.task import TaskSpec
from schemas.errors import UsageError
from sidetune.bench.flower_lora import KEYS, run_baselines
from sidetune.bench.shards import make_shards
from sidetune.data import Review

try:
    from tests.tiny_models import exported_tiny
except ImportError:  # pragma: no cover - run from tests/
    from tiny_models import exported_tiny

TASK = TaskSpec.from_dict(
    {
        "name": "tiny-sentiment",
        "template": "Review: {text}\nSentiment:",
        "classes": ["fresh", "rotten"],
        "verbalizers": [" positive", " negative"],
    }
)


def _shards():
    rng = np.random.default_rng(0)
    good, bad = (
        "good great fun brilliant excellent love".split(),
        "bad awful boring dull weak hate".split(),
    )
    rows = []
    for i in range(120):
        y = int(rng.integers(2))
        words = [
            *rng.choice(good if y == 0 else bad, 4),
            *rng.choice("the movie film plot acting".split(), 3),
        ]
        rows.append(Review(" ".join(rng.permutation(words)) + f" {i}", TASK.classes[y]))
    return make_shards(rows, TASK.classes, boards=2, per_board=40, holdout=32, seed=0)


def _our_processes(marker: str) -> list[int]:
    found = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmd.read_bytes().decode(errors="replace"):
                found.append(int(cmd.parent.name))
        except OSError:
            pass
    return found


def test_flower_fedavg_lora_on_the_tiny_backbone(tmp_path_factory, tmp_path):
    backbone, _ = exported_tiny(tmp_path_factory, "llama")
    shards = _shards()["dirichlet"]
    lines: list[str] = []
    out = tmp_path / "out"
    rows = run_baselines(
        shards,
        out,
        backbone_dir=backbone,
        task=TASK,
        quick=True,
        methods=["flower_fedavg_lora"],
        cache_dir=tmp_path / "cache",
        progress=lines.append,
    )
    assert list(rows) == ["flower_fedavg_lora"]
    m = rows["flower_fedavg_lora"]
    assert tuple(m) == KEYS
    assert (
        0.0 <= m["accuracy_mean"] == m["accuracy_min"] <= 1.0
    )  # one global adapter on every board
    saved = json.loads((out / "baselines-dirichlet.json").read_text())
    assert saved["methods"] == json.loads(json.dumps(rows))
    d = saved["details"]["flower_fedavg_lora"]
    assert (
        d["rounds"] == 1 and d["local_epochs"] == 1 and set(d["accuracy_per_round"]) == {"0", "1"}
    )
    # bytes: the adapter up (every tensor trained, none alike) and down (the initial one: PEFT's
    # zero B matrices are one object, sent once) — counted from the messages, with little overhead
    final = load_file(
        str(out / "work-dirichlet" / "flower" / "server" / "adapter-round-1.safetensors")
    )
    tensors = sum(a.nbytes for a in final.values())
    a_only = sum(a.nbytes for k, a in final.items() if "lora_A" in k)
    assert tensors > 1000
    assert tensors <= m["bytes_up_per_board"] < tensors + 12_000
    assert a_only <= m["bytes_down_per_board"] < tensors + 12_000
    per_board = d["per_board"]
    assert [b["board"] for b in per_board] == [0, 1]
    for b in per_board:  # each board's own ClientApp process and its SuperNode + SuperExec
        assert b["clientapp_cpu_s"] > 0.5 and b["flower_processes_cpu_s"] > 0.1
        assert b["device_cpu_s"] == pytest.approx(
            b["clientapp_cpu_s"] + b["flower_processes_cpu_s"]
        )
        assert b["clientapp_peak_rss_mb"] > 100
    assert m["device_cpu_s_per_board"] > 1 and m["device_peak_rss_mb"] > 200
    assert m["time_to_adapter_s"] > 1
    assert any("flower: round 1 done" in line for line in lines)
    assert not _our_processes(
        str(tmp_path)
    )  # the SuperLink, SuperNodes and their children are gone


def test_lora_alone_and_central_on_the_tiny_backbone(tmp_path_factory, tmp_path):
    backbone, _ = exported_tiny(tmp_path_factory, "llama")
    shards = _shards()["iid"]
    rows = run_baselines(
        shards,
        tmp_path / "out",
        backbone_dir=backbone,
        task=TASK,
        quick=True,
        methods=["lora_alone", "central_lora"],
        cache_dir=tmp_path / "cache",
        progress=lambda _m: None,
    )
    assert list(rows) == ["lora_alone", "central_lora"]
    alone, central = rows["lora_alone"], rows["central_lora"]
    assert tuple(alone) == tuple(central) == KEYS
    assert 0.0 <= alone["accuracy_min"] <= alone["accuracy_mean"] <= 1.0
    assert (
        alone["bytes_up_per_board"] == alone["bytes_down_per_board"] == 0.0
    )  # nothing leaves a board
    assert alone["device_cpu_s_per_board"] > 0.5 and alone["device_peak_rss_mb"] > 100
    assert central["device_cpu_s_per_board"] is None and central["device_peak_rss_mb"] is None
    texts = [len(json.dumps([[r.text, r.label] for r in b]).encode()) for b in shards.boards]
    assert central["bytes_up_per_board"] == pytest.approx(np.mean(texts))
    assert central["bytes_down_per_board"] > 1000  # the adapter's safetensors
    d = json.loads((tmp_path / "out" / "baselines-iid.json").read_text())["details"]
    assert d["lora_alone"]["boards_run"] == 2 and d["central_lora"]["max_epochs"] == 1
    assert set(d["wall_s"]) == {"lora_alone", "central_lora"}


def test_an_unknown_baseline_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="unknown baseline 'fedprox'"):
        run_baselines(
            _shards()["iid"], tmp_path, backbone_dir=tmp_path, task=TASK, methods=["fedprox"]
        )


def test_a_failing_server_app_stops_the_federation_with_its_error(tmp_path):
    from sidetune.bench.flower_run import FederationFailed, run_federation

    part = tmp_path / "board-0.npz"
    np.savez(
        part, train_flat=np.arange(4), train_offsets=np.array([0, 4]), train_labels=np.array([0])
    )
    cfg = {
        "model-dir": str(tmp_path / "no-model"),
        "verbalizer-ids": "1,2",
        "pad-id": 0,
        "boards": 1,
        "rounds": 1,
        "local-epochs": 1,
        "lr": 3e-4,
        "batch-size": 8,
        "threads": 1,
        "seed": 0,
    }
    with pytest.raises(FederationFailed, match="the ServerApp failed: .*no-model"):
        run_federation([part], cfg, tmp_path / "fed", 1, progress=lambda _m: None, timeout_s=300)
    assert not _our_processes(str(tmp_path))


def test_the_budget_estimates_each_row():
    from sidetune.bench.flower_lora import FULL, QUICK, LoraBudget

    full = FULL.estimate(8, 250, 400)
    assert list(full) == ["lora_alone", "flower_fedavg_lora", "central_lora"]
    assert all(v["cpu_s"] > 0 and v["wall_min"] > 0 for v in full.values())
    more = LoraBudget(alone_boards=None, flower_rounds=2).estimate(8, 250, 400)
    assert more["lora_alone"]["cpu_s"] == pytest.approx(
        4 * full["lora_alone"]["cpu_s"]
    )  # 8 boards, not 2
    assert more["flower_fedavg_lora"]["wall_min"] > 1.8 * full["flower_fedavg_lora"]["wall_min"]
    assert QUICK.estimate(8, 250, 400)["central_lora"]["cpu_s"] < full["central_lora"]["cpu_s"] + 1
