"""What the server can see (DESIGN §2): no text, no token ids, no labels; mixed targets of randomised labels only.

The real loop runs one round (edge agent + worker, tiny llama, real mosquitto
and Redis) while a separate client logged in as the server account records
every uplink payload, as a curious server would.
"""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pytest

from edge_agent import adapter as adapters
from edge_agent.agent import EdgeAgent
from edge_agent.keys import KEY_DOMAIN
from schemas import (
    ActivationBatch,
    AdapterUpdate,
    DeviceStatus,
    HyperParams,
    Job,
    SideNetSpec,
    SpecMismatch,
    decode,
    encode,
    encode_weights,
    expected_shapes,
)
from sidetune.services import SERVER_USER
from tests.loop_helpers import (
    AgentThread,
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

N = 120
CLASSES = ("fresh", "rotten")


class Sniffer:
    """The server account reading every device's uplinks, as a curious server would."""

    def __init__(self, client) -> None:
        self.payloads: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        client.on_message = self._on_message
        client.on_subscribe = lambda *_: subscribed.set()
        client.subscribe([(f"sidetune/v1/+/{k}", 1) for k in ("jobs", "activations", "status")])
        assert subscribed.wait(5), "no SUBACK for the uplinks"

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.payloads.append((msg.topic, bytes(msg.payload)))

    def of(self, device: str) -> list[tuple[str, bytes]]:
        with self._lock:
            return [(t, p) for t, p in self.payloads if t.split("/")[2] == device]


def adapter_for(device: str, spec: SideNetSpec, fingerprint: str, version: int) -> AdapterUpdate:
    weights = encode_weights({k: np.zeros(s, np.float32) for k, s in expected_shapes(spec).items()}, spec)
    return AdapterUpdate(device_id=device, job_id="forged", version=version, backbone_fingerprint=fingerprint,
                         spec=spec, weights=weights)


def test_the_server_sees_no_text_no_token_ids_no_labels_and_only_mixed_targets_of_randomised_labels(
        tmp_path, tiny_backbone, mosquitto, redis_url, broker_accounts, device_account, mqtt_client):
    device, password = device_account
    sniffer = Sniffer(mqtt_client(SERVER_USER))
    samples = make_samples(N, seed=7)
    settings = edge_settings(tmp_path, tiny_backbone, mosquitto, device, password, upload_batch=16,
                             hyper=HyperParams(epochs=3, lr=3e-3, batch_size=32))
    worker = start_worker(server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER],
                                          worker_id=f"priv-{device}", share_group=f"priv-{device}"))
    try:
        agent = EdgeAgent(settings)
        with AgentThread(agent):
            request_round(agent, samples)
            r1 = wait_for(lambda: round_state(agent, 1), 60, "round 1")
            assert r1["state"] == "done", r1
            ledger = {s.key: s for s in agent.ledger.samples()}
    finally:
        worker.stop()
        clear_device(mqtt_client, device, [f"priv-{device}"])

    seen = sniffer.of(device)
    kinds = [t.rsplit("/", 1)[1] for t, _ in seen]
    assert kinds.count("jobs") == 1 and kinds.count("activations") >= -(-N // 16) and "status" in kinds, kinds
    blob = b"\n".join(p for _, p in seen)
    assert min(ledger).encode() in blob  # the sniffer does see what travels (the keys, in the job)

    # ---- no text: no sample, no word of one longer than 5 characters, no label, no class name, no task wording
    words = {w for s in samples for w in s["text"].split() if len(w) > 5}
    assert len(words) > 5
    for s in samples:
        assert s["text"].encode() not in blob
    task_words = {"sentiment", "positive", "negative", "Review"}
    for w in words | set(CLASSES) | task_words:
        for form in {w, w.lower(), w.capitalize(), w.upper()}:
            assert form.encode() not in blob, f"{form!r} travels to the server"
            assert form.encode("utf-16-le") not in blob, f"{form!r} (UTF-16) travels to the server"

    # ---- no token ids: neither the prompt's nor the text's, as int32 or int64
    assert len(ledger) == N
    for s in ledger.values():
        ids = np.asarray(s.token_ids)
        for seq in (ids, ids[-6:]):
            for dt in ("<i4", "<i8", ">i4", ">i8"):
                assert seq.astype(dt).tobytes() not in blob, f"token ids {seq.tolist()} travel as {dt}"

    # ---- decode everything; only pivot vectors travel, keys are keyed hashes
    messages = [decode(t, p) for t, p in seen]
    jobs = [m for m in messages if isinstance(m, Job)]
    batches = [m for m in messages if isinstance(m, ActivationBatch)]
    assert all(isinstance(m, (Job, ActivationBatch, DeviceStatus)) for m in messages)
    (job,) = jobs
    spec = job.spec
    for b in batches:
        assert tuple(b.states.shape[1:]) == (len(spec.wire_rows), spec.width)  # pivot vectors, never T×L×d
    assert set(job.keys) == set(ledger)
    for s in list(ledger.values())[:10]:
        plain = hashlib.sha256(KEY_DOMAIN + job.backbone_fingerprint.encode() + b"\0" + spec.key_scope(agent.backbone.pivot).encode() + b"\0"
                               + np.asarray(s.token_ids, "<i8").tobytes()).hexdigest()
        assert plain not in job.keys  # without the device's secret the server cannot test a guessed text

    # ---- the targets are the mixed residual of the randomised label, not a label, not the plain residual
    targets = job.targets.to_array()  # (N, K)
    c = len(CLASSES)
    assert targets.shape == (N, spec.out_dim) and spec.out_dim > c
    true = np.array([ledger[k].label for k in job.keys])
    labels = np.array([ledger[k].sent_label for k in job.keys])  # label-DP (ε = 2 by default): randomised
    assert 0 < np.sum(labels != true) < N // 4  # e^2/(1+e^2): about 12 % reported as the other class
    raw = np.stack([ledger[k].prior for k in job.keys])  # (N, C): the backbone's p_b
    prior = agent.model.calibrated(raw)  # p_cal: the board's own calibration, fitted without labels
    assert agent.model.prior_bias is not None and np.allclose(prior.mean(0), 1 / c, atol=1e-4)
    onehot = np.eye(c)[labels]
    residual = onehot - prior
    assert not np.allclose(targets @ agent.secret.mixing(c), np.eye(c)[true] - prior, atol=1e-3)
    assert not np.isin(targets, (0.0, 1.0)).all(), "targets are one-hot"
    for plain in (onehot, residual):
        for cols in ((0, 1), (1, 0)):
            assert not np.allclose(targets[:, list(cols)], plain, atol=0.05), "targets are the plain residual"
    m = agent.secret.mixing(c)  # (K, C)
    np.testing.assert_allclose(targets @ m, residual, atol=1e-5)  # exactly M·(onehot − p_cal), seen through M
    rest = targets - (targets @ m) @ m.T  # what lies outside M's columns: noise the server cannot tell apart
    assert np.linalg.norm(rest, axis=1).mean() > 0.1


def test_the_board_refuses_an_adapter_for_another_backbone_or_spec(tmp_path, tiny_backbone, mosquitto,
                                                                   device_account, mqtt_client):
    device, password = device_account
    agent = EdgeAgent(edge_settings(tmp_path, tiny_backbone, mosquitto, device, password))
    other_spec = agent.spec.model_copy(update={"out_dim": agent.spec.out_dim + 1})
    forged_fp = adapter_for(device, agent.spec, "cd" * 32, 2)
    forged_spec = adapter_for(device, other_spec, agent.backbone.fingerprint, 3)
    good = adapter_for(device, agent.spec, agent.backbone.fingerprint, 4)
    for bad in (forged_fp, forged_spec):
        with pytest.raises(SpecMismatch):
            adapters.check_update(bad, agent.spec, agent.backbone.fingerprint)
    adapters.check_update(good, agent.spec, agent.backbone.fingerprint)
    try:
        with AgentThread(agent):
            server = mqtt_client(SERVER_USER)
            first = adapter_for(device, agent.spec, agent.backbone.fingerprint, 1)
            for _ in range(40):  # until the agent is subscribed and has taken a good adapter
                if agent.adapter is not None:
                    break
                server.publish(*encode(first), qos=1).wait_for_publish(5)
                time.sleep(0.25)
            assert agent.adapter is not None and agent.adapter.version == 1
            for msg in (forged_fp, forged_spec, good):  # in order: once v4 is in, v2 and v3 were looked at
                server.publish(*encode(msg), qos=1).wait_for_publish(5)
            wait_for(lambda: agent.adapter is not None and agent.adapter.version == 4, 10, "the good adapter")
        assert not (agent.state_dir / "adapter" / "v2.safetensors").exists()
        assert not (agent.state_dir / "adapter" / "v3.safetensors").exists()
    finally:
        clear_device(mqtt_client, device)
