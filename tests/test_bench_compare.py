"""`sidetune bench compare`: byte counts from real encoded messages, a child's own CPU and memory, and the
whole command on the tiny backbone (forward passes, int8 graph, a real round with mosquitto + Redis + a
worker + an agent, LoRA with PEFT, results.json in the contract's exact shape, report and plots)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from schemas.spec import HyperParams, SideNetSpec
from schemas.wire import encode
from sidetune.bench import traffic
from sidetune.bench.compare import FIELDS, METHODS, run_compare
from sidetune.bench.measure import run_child

try:
    from tests.tiny_models import exported_tiny
except ImportError:  # pragma: no cover - run from tests/
    from tiny_models import exported_tiny

SPEC = SideNetSpec(num_states=5, width=32, taps=(2, 4), bottleneck=4, out_dim=8)


def _weights() -> bytes:
    from side_server.sidenet import SideNet

    return SideNet(SPEC).to_weights()


def test_sidetune_bytes_are_the_encoded_messages():
    from schemas.activations import ActivationBatch
    from schemas.jobs import Job
    from schemas.tensors import WireTensor

    rng = np.random.default_rng(0)
    states = rng.normal(size=(100, 5, 32)).astype(np.float16)
    hyper = HyperParams(epochs=3)
    fp = "ab" * 32
    b = traffic.sidetune_bytes(states, SPEC, hyper, fp, _weights(), upload_batch=64)
    keys = traffic.keys_of(100)
    job = Job(device_id=traffic.DEVICE, job_id=traffic.JOB, backbone_fingerprint=fp, spec=SPEC, hyper=hyper,
              keys=keys, targets=WireTensor.from_array(np.zeros((100, 8), np.float32)))
    up = len(encode(job)[1]) + sum(
        len(encode(ActivationBatch(device_id=traffic.DEVICE, job_id=traffic.JOB, backbone_fingerprint=fp,
                                   keys=keys[i : i + 64],
                                   states=WireTensor(dtype="float16", shape=states[i : i + 64].shape,
                                                     data=states[i : i + 64].tobytes())))[1])
        for i in (0, 64))
    assert b["up"] == pytest.approx(up / 100, abs=0.1)  # sent_at: its decimal digits vary by a few bytes
    assert b["per_sample"] == pytest.approx(b["up"] + b["down"])
    assert b["up"] > 5 * 32 * 2  # at least the states themselves
    int8 = traffic.sidetune_bytes(states, SPEC, hyper, fp, _weights(), wire_dtype="int8")
    assert int8["up"] < b["up"]
    wide = rng.normal(size=(64, 5, 512)).astype(np.float16)  # a real width: the keys' share is small
    ratio = traffic.activation_bytes(wide, "int8", fp) / traffic.activation_bytes(wide, "float16", fp)
    assert 0.5 < ratio < 0.52  # 1 byte and a 4-byte scale per 512-wide vector, instead of 2 bytes
    lengths = [10, 12, 12, 30]
    full = traffic.full_activation_bytes(lengths, 5, 32, SPEC, hyper, fp, _weights())
    assert full["up"] > hyper.epochs * np.mean(lengths) * 5 * 32 * 2  # every token, every state, every epoch
    split = traffic.split_learning_bytes(lengths, 32, hyper.epochs, SPEC, hyper, fp)
    assert split["down"] > hyper.epochs * np.mean(lengths) * 32 * 2  # a gradient per token, every epoch


def test_a_failing_child_is_one_clear_error(tmp_path):
    from sidetune.bench.measure import ChildFailed

    with pytest.raises(ChildFailed, match=r"the nonsense process failed \(exit 1\): .*unknown kind"):
        run_child("nonsense", {}, tmp_path, 1, progress=lambda m: None)


@pytest.mark.integration
def test_compare_on_the_tiny_backbone(tmp_path_factory, tmp_path):
    backbone, manifest = exported_tiny(tmp_path_factory, "llama")
    task = tmp_path / "task.toml"
    task.write_text('name = "tiny-sentiment"\ntemplate = "Review: {text}\\nSentiment:"\n'
                    'classes = ["fresh", "rotten"]\nverbalizers = [" positive", " negative"]\n')
    lines: list[str] = []
    out = tmp_path / "out"
    results = run_compare(backbone, [str(task)], out, train=48, holdout=24, seeds=2, lora_epochs=1,
                          ingest_samples=128, cache_dir=tmp_path / "cache", progress=lines.append)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    # the contract's shape, field for field
    assert list(on_disk) == ["tasks", "hardware"] and len(on_disk["tasks"]) == 1
    hw = on_disk["hardware"]  # the limit: the forward pass's FLOP rate against ONNX Runtime's GEMM peak
    assert hw["gemm_peak_gflops"] > 0 and hw["gemm_peak_int8_gops"] > 0
    assert set(hw["forward_gflops"][on_disk["tasks"][0]["task"]]) == {"fp32", "int8"}
    t = on_disk["tasks"][0]
    assert list(t) == ["task", "dataset", "train", "holdout", "backbone", "methods", "server"]
    assert t["dataset"] == "rotten_tomatoes" and (t["train"], t["holdout"]) == (48, 24)
    assert t["backbone"] == {"fingerprint": manifest.fingerprint, "num_layers": manifest.num_layers,
                             "hidden_size": manifest.hidden_size}
    assert tuple(t["methods"]) == METHODS
    assert all(tuple(m) == FIELDS for m in t["methods"].values())
    assert list(t["server"]) == ["ingest_samples_per_s", "train_samples_per_s"]
    m = t["methods"]
    for name in ("zero_shot", "recalibrated", "sidetune", "sidetune_int8", "sidetune_int8_wire", "labels_in_clear",
                 "lora"):
        assert 0.0 <= m[name]["accuracy"] <= 1.0, name
    assert m["sidetune"]["accuracy_std"] is not None and m["lora"]["accuracy_std"] is None
    # bytes: sidetune's pivot states once; the alternatives every token (and epoch)
    s = m["sidetune"]
    assert m["zero_shot"]["bytes_per_sample"] == m["lora"]["bytes_per_sample"] == 0.0
    assert s["bytes_per_sample"] > manifest.hidden_size * (manifest.num_layers + 1) * 2
    assert m["sidetune_int8_wire"]["bytes_per_sample"] < s["bytes_per_sample"]
    assert m["full_activation"]["bytes_per_sample"] > 20 * s["bytes_per_sample"]
    assert m["split_learning"]["bytes_per_sample"] > s["bytes_per_sample"]
    # the device's own processes: the real agent for sidetune, the int8 graph's forward process, LoRA
    assert s["forward_passes_per_sample"] == 1.0 and m["lora"]["forward_passes_per_sample"] == 1.0
    for name in ("sidetune", "sidetune_int8", "lora", "recalibrated"):
        assert m[name]["device_cpu_s"] > 0 and m[name]["device_peak_rss_mb"] > 50, name
    # the agent's own peak (its VmHWM), not wait4's, which keeps this test process's RSS at the fork
    assert s["device_peak_rss_mb"] < 400
    assert s["time_to_adapter_s"] > 0 and s["forward_floor_s"] > 0
    assert m["sidetune_int8"]["forward_floor_s"] > 0  # each board graph's own floor
    assert s["graph"] == "fp32" and m["sidetune_int8"]["graph"] == "int8" and m["lora"]["graph"] is None
    assert m["full_activation"]["device_cpu_s"] is None and m["full_activation"]["accuracy"] is None
    assert t["server"]["ingest_samples_per_s"] > 0 and t["server"]["train_samples_per_s"] > 0
    report = (out / "report.md").read_text()
    assert "| sidetune |" in report and "time to adapter ≤ 1.1× the forward floor" in report
    # scored on the agent's default path (label-DP at its ε), and LoRA against two rounds of fresh data
    assert "labels randomised at ε = 2" in report
    two = next(line for line in report.splitlines() if line.startswith("| sidetune (each sample run once) |"))
    one_round, two_rounds = (float(x) for x in two.split("|")[2:4])
    assert two_rounds == pytest.approx(2 * one_round, abs=1)
    task_details = json.loads((out / "details.json").read_text())["tasks"][0]
    details = task_details["accuracies"]
    assert len(details["sidetune_no_label_dp"]) == 2 and details["label_epsilon"] == [2.0]
    # where the run's time went: every phase timed, and the report says so
    assert list(task_details["phases_s"]) == ["forward passes, int8 graph", "forward passes, fp32 graph",
                                              "real round", "side networks", "LoRA"]
    assert all(v > 0 for v in task_details["phases_s"].values())
    assert "Where the time went: int8 graph" in report and "LoRA" in report.split("Where the time went")[1]
    for png in ("accuracy_vs_bytes.png", "device_cost.png", "time_to_adapter.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert any("real round" in line for line in lines) and any("lora" in line for line in lines)
