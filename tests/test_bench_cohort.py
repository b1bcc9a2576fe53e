"""`sidetune bench cohort`'s own rows: the side-network rows on synthetic features, the real cohort
round on the tiny backbone (agents and a worker over a real mosquitto and Redis), and the report."""

from __future__ import annotations

import numpy as np
import pytest

from sidetune.bench.cohort import KEYS, Boards, side_rows
from sidetune.bench.cohort_report import table, targets, write_report
from sidetune.bench.features import TaskFeatures


def _synthetic(n_boards: int = 4, per: int = 100, c: int = 3, seed: int = 0) -> Boards:
    rng = np.random.default_rng(seed)

    def feats(n: int) -> TaskFeatures:
        y = rng.integers(0, c, n)
        states = rng.normal(size=(n, 5, 16))
        for k in range(c):  # every tapped layer carries the class, each in dimensions of its own
            states[y == k, :, 4 * k : 4 * k + 4] += 0.8
        prior = np.full((n, c), 1.0 / c) + rng.normal(0, 0.02, (n, c))
        return TaskFeatures(states.astype(np.float16), prior.astype(np.float32), y)

    f = feats(n_boards * per)
    return Boards(f, [per] * n_boards, feats(150), [1.0] * n_boards, 100.0)


def test_side_rows_pool_learns_more_than_a_board_alone_and_costs_the_board_little():
    rows = side_rows(_synthetic(), epochs=12, seed=0, progress=lambda m: None)
    assert set(rows) == {"alone", "cohort_clear", "cohort_federated", "cohort_personal", "cohort_federated_dp",
                         "pooled_offline", "pooled_hostile_member"}
    assert rows["pooled_hostile_member"]["others_mean"] > rows["pooled_offline"]["others_mean"] - 0.1
    mean = {k: float(np.mean(v["accuracies"])) for k, v in rows.items()}
    assert mean["cohort_federated"] > 0.85 and mean["cohort_clear"] > 0.85, mean
    assert mean["cohort_federated"] > mean["alone"] + 0.03, mean  # label-DP at ε = 2 on 100 samples a board
    fed = rows["cohort_federated"]
    assert fed["rounds"] == 3 and fed["bytes_up"] > 0 and fed["bytes_down"] > 0
    assert 0 < fed["board_train_cpu_s"] < 30
    assert rows["cohort_federated_dp"]["user_dp_epsilon"] > 0


def test_the_report_names_every_method_and_checks_the_targets(tmp_path):
    row = {k: 1.0 for k in KEYS}
    methods = {"alone": {**row, "accuracy_mean": 0.40, "accuracy_min": 0.35},
               "cohort_federated": {**row, "accuracy_mean": 0.52, "accuracy_min": 0.50, "device_cpu_s_per_board": 60.0,
                                    "device_peak_rss_mb": 700.0, "bytes_up_per_board": 1e6, "bytes_down_per_board": 1e6},
               "flower_fedavg_lora": {**row, "accuracy_mean": 0.50, "accuracy_min": 0.50,
                                      "device_cpu_s_per_board": 900.0, "device_peak_rss_mb": 2800.0,
                                      "bytes_up_per_board": 9e6, "bytes_down_per_board": 9e6}}
    got = {what: ok for what, ok, _ in targets(methods)}
    assert got["mean accuracy ≥ Flower − 1 point (`cohort_federated`)"] is True
    assert got["device CPU ≥ 10× below Flower's clients (`cohort_federated`)"] is True
    assert got["peak RSS ≥ 3× below Flower's clients (`cohort_federated`)"] is True
    assert got["bytes per board ≥ 5× below Flower's (`cohort_federated`)"] is True  # 18e6 / 2e6 = 9×
    assert "Flower FedAvg-LoRA" in table(methods)
    results = {"setup": {"boards": 2, "per_board": 40, "holdout": 60, "alpha": 0.5, "epochs": 5,
                         "federated_rounds": 3, "federated_local_epochs": 10},
               "shards": {"iid": {"methods": methods, "details": {"side_rows": {}}}}, "seconds": 60.0}
    assert "## iid shards" in write_report(results, tmp_path).read_text()


@pytest.mark.integration
def test_the_real_cohort_round_scores_every_board_with_the_adapter_it_installed(tmp_path, tiny_backbone):
    from edge_agent.backbone import Backbone
    from edge_agent.task import TaskSpec
    from sidetune.bench.cohort_round import cohort_round
    from sidetune.bench.features import extract_all
    from sidetune.data import Review
    from tests.loop_helpers import TASK_TOML, make_samples

    task_file = tmp_path / "task.toml"
    task_file.write_text(TASK_TOML)
    task = TaskSpec.from_toml(task_file)
    shards = [[Review(r["text"], r["label"]) for r in make_samples(80, seed=s)] for s in (1, 2)]
    ho = extract_all(Backbone.load(tiny_backbone), task, [Review(r["text"], r["label"])
                                                          for r in make_samples(100, seed=9)], None, 32)
    from sidetune.bench.compare import side_spec

    spec = side_spec(ho)  # what an agent with default settings asks for, as the bench builds it
    out = cohort_round(tiny_backbone, task, shards, ho, spec, tmp_path / "round", pool="activations", epochs=5,
                       progress=lambda m: None)
    boards = out["boards"]
    assert len(boards) == 2 and out["version"] >= 1
    for b in boards.values():
        assert b["samples"] == 80 and b["forward_passes"] == 80 and b["bytes_up"] > 80 * 4 * 32 * 2
        assert b["bytes_down"] > 0 and b["cpu_s"] > 0 and b["peak_rss_mb"] > 0 and b["time_to_adapter_s"] > 0
        assert 0.0 <= b["accuracy"] <= 1.0
