"""Cohorts: boards of one task train one side network on their pooled samples.

Unit tests of the shares, the registry and the provisioning; then the whole loop through a
real mosquitto and Redis: two members get one adapter trained on both boards' samples, a
board that is not a member can neither add to the pool nor read the cohort's adapter, a
member that joins late gets the current version at once, a member's job of another task is
refused, and the cohort's secret never reaches the server.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.secret import DeviceSecret, cohort_secret_json, with_cohort_basis
from schemas.errors import UsageError
from side_server.cohorts import CohortRegistry, capped_shares, member_weights


def test_shares_are_proportional_until_capped_and_the_rest_is_shared_out():
    np.testing.assert_allclose(capped_shares([100, 100, 200], 1.0), [0.25, 0.25, 0.5])
    # cap 0 (the default) or anything at or below 1/M: every member an equal share
    np.testing.assert_allclose(capped_shares([10, 100, 1000], 0.0), [1 / 3] * 3)
    # one member with 90 % of the samples is held to 40 %; the others share the rest in proportion
    got = capped_shares([900, 50, 50], 0.4)
    np.testing.assert_allclose(got, [0.4, 0.3, 0.3])
    w = member_weights([900, 50, 50], 0.4)
    assert w.shape == (1000,) and w.mean() == pytest.approx(1.0)
    assert w[:900].sum() / w.sum() == pytest.approx(0.4)


def test_the_registry_follows_its_file(tmp_path):
    path = tmp_path / "cohorts.json"
    reg = CohortRegistry(path)
    assert reg.cohort_of("dev-1") is None  # no file: no cohorts
    path.write_text(json.dumps({"devices": {"dev-1": "press", "dev-2": "press", "dev-3": "lathe"}}))
    reg._checked = 0.0
    assert reg.members("press") == ["dev-1", "dev-2"] and reg.cohort_of("dev-3") == "lathe"
    time.sleep(0.01)
    path.write_text(json.dumps({"devices": {"dev-1": "lathe"}}))
    os.utime(path, (time.time() + 5, time.time() + 5))
    reg._checked = 0.0
    assert reg.members("press") == [] and reg.members("lathe") == ["dev-1"]


def test_a_cohort_secret_shares_the_basis_and_keeps_the_boards_own_key(tmp_path):
    path = tmp_path / "cohort.json"
    path.write_text(cohort_secret_json("press", 8))
    a, b = DeviceSecret.generate(8), DeviceSecret.generate(8)
    ca, cb = with_cohort_basis(a, path, "press", 8), with_cohort_basis(b, path, "press", 8)
    np.testing.assert_array_equal(ca.basis, cb.basis)
    assert ca.key == a.key and cb.key == b.key and ca.key != cb.key
    with pytest.raises(ValueError, match="cohort 'press', this board is in 'lathe'"):
        with_cohort_basis(a, path, "lathe", 8)
    with pytest.raises(ValueError, match="orthogonal 6x6"):
        with_cohort_basis(a, path, "press", 6)


def test_provisioning_records_membership_and_writes_it_into_the_bundle(tmp_path):
    from sidetune.provision import (
        BrokerParams,
        add_device,
        cohorts,
        init_broker,
        remove_device,
        set_cohort,
    )

    d = tmp_path / "broker"
    init_broker(d, BrokerParams(hostnames=["broker.example"]))
    assert "cohorts_file" in (d / "server.toml").read_text()
    bundle = add_device(d, "board-1", cohort="press")
    add_device(d, "board-2")
    toml = (bundle / "edge.toml").read_text()
    assert 'cohort = "press"' in toml and "cohort_secret_file" in toml
    assert cohorts(d) == {"board-1": "press"}
    assert set_cohort(d, "board-2", "press") is None
    assert set_cohort(d, "board-1", "lathe") == "press"
    assert cohorts(d) == {"board-1": "lathe", "board-2": "press"}
    set_cohort(d, "board-1", None)
    assert cohorts(d) == {"board-2": "press"}
    with pytest.raises(UsageError, match="bad cohort name"):
        set_cohort(d, "board-2", "no/slash")
    with pytest.raises(UsageError, match="no device ghost"):
        set_cohort(d, "ghost", "press")
    remove_device(d, "board-2")
    assert cohorts(d) == {}
    # the server's settings read the registry init pointed them at
    from schemas.settings import load_settings
    from side_server.config import ServerSettings

    assert load_settings(ServerSettings, d / "server.toml").cohorts_file == d / "cohorts.json"


# --------------------------------------------------------------------------- the loop


def _cohort(tmp_path: Path, name: str, devices: list[str], out_dim: int = 4) -> tuple[Path, Path]:
    """The operator's two files: the registry (every device a member of ``name``) and the secret."""
    registry = tmp_path / "cohorts.json"
    registry.write_text(json.dumps({"devices": {d: name for d in devices}}))
    secret = tmp_path / "cohort.json"
    secret.write_text(cohort_secret_json(name, out_dim))
    return registry, secret


def _spy(mqtt_client, devices: list[str]) -> tuple[list[tuple[str, bytes]], threading.Lock]:
    """Everything these devices publish, as the server's account receives it."""
    from sidetune.services import SERVER_USER

    got: list[tuple[str, bytes]] = []
    lock = threading.Lock()
    spy = mqtt_client(SERVER_USER)
    subscribed = threading.Event()

    def on_message(client: object, userdata: object, m: object) -> None:
        with lock:
            got.append((m.topic, m.payload))  # type: ignore[attr-defined]

    spy.on_message = on_message
    spy.on_subscribe = lambda *_: subscribed.set()
    spy.subscribe([(f"sidetune/v1/{d}/+", 1) for d in devices])
    assert subscribed.wait(5)
    return got, lock


@pytest.mark.integration
def test_members_train_one_adapter_on_both_boards_samples(tmp_path, tiny_backbone, mosquitto, redis_url,
                                                          broker_accounts, device_accounts, mqtt_client, caplog,
                                                          capsys):
    import redis

    from edge_agent.agent import EdgeAgent
    from schemas.topics import topic
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
        write_jsonl,
    )

    (a, pa), (b, pb), (outsider, po), (late, pl), (odd, pd) = device_accounts(5)
    registry, secret = _cohort(tmp_path, "press", [a, b, odd])
    basis = np.asarray(json.loads(secret.read_text())["basis"])
    # Everything the boards send, as the server receives it (the secret must never be in it).
    uplinks, lock = _spy(mqtt_client, [a, b, outsider, late, odd])

    holdout = write_jsonl(tmp_path / "holdout.jsonl", make_samples(200, seed=99))

    def member(device: str, password: str, **kw: object):
        return edge_settings(tmp_path, tiny_backbone, mosquitto, device, password, holdout_file=holdout,
                             cohort="press", cohort_secret_file=secret, label_epsilon=float("inf"),
                             pool="activations", **kw)

    worker = start_worker(server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER],
                                          cohorts_file=registry))
    caplog.set_level("INFO")
    try:
        with AgentThread(EdgeAgent(member(a, pa))) as agent_a, AgentThread(EdgeAgent(member(b, pb))) as agent_b:
            request_round(agent_a, make_samples(150, seed=1))
            r_a = wait_for(lambda: round_state(agent_a, 1), 120, "a's round")
            assert r_a["state"] == "done" and r_a["adapter_version"] == 1, r_a
            request_round(agent_b, make_samples(150, seed=2))
            r_b = wait_for(lambda: round_state(agent_b, 1), 120, "b's round")
            assert r_b["state"] == "done", r_b
            # b's job trained the cohort's network on both boards' 300 samples, and a got it too
            assert agent_b.adapter is not None and agent_b.adapter.version == 2
            assert agent_b.adapter.metrics["samples"] == 300 and agent_b.adapter.metrics["cohort_members"] == 2
            wait_for(lambda: agent_a.adapter is not None and agent_a.adapter.version == 2, 20, "a to install v2")
            for k, v in agent_b.adapter.forward.w.items():
                np.testing.assert_array_equal(agent_a.adapter.forward.w[k], v)
            assert r_b["tuned_accuracy"] > r_b["zero_shot_accuracy"] + 0.1, r_b

            # A board that names the cohort but is no member: refused, nothing pooled.
            with AgentThread(EdgeAgent(member(outsider, po))) as agent_o:
                request_round(agent_o, make_samples(60, seed=3))
                r_o = wait_for(lambda: round_state(agent_o, 1), 60, "the outsider's round")
                assert r_o["state"] == "failed" and "not a member of cohort press" in r_o["detail"], r_o
            # ... and cannot read a member's (the cohort's) adapter: the broker's ACL
            got: list[object] = []
            peek = mqtt_client(outsider, po)
            peek.on_message = lambda c, u, m: got.append(m)
            peek.subscribe(topic(a, "adapter"), 1)
            time.sleep(1.0)
            assert got == []

            # A member of another task (other taps: another spec) is refused with its own code.
            with AgentThread(EdgeAgent(member(odd, pd, taps=[2, 4]))) as agent_d:
                request_round(agent_d, make_samples(60, seed=4))
                r_d = wait_for(lambda: round_state(agent_d, 1), 60, "the odd member's round")
                assert r_d["state"] == "failed" and "cohort press trains the side network" in r_d["detail"], r_d

            # A member that joins later gets the current version as soon as it comes online.
            registry.write_text(json.dumps({"devices": {a: "press", b: "press", late: "press"}}))
            time.sleep(1.2)  # the workers re-read the registry within a second
            with AgentThread(EdgeAgent(member(late, pl))) as agent_l:
                wait_for(lambda: agent_l.adapter is not None and agent_l.adapter.version == 2, 20,
                         "the late member to get v2")
        # The cohort's secret never reached the server: not in any uplink, Redis value or log line.
        with lock:
            payloads = [p for _, p in uplinks]
        assert len(payloads) > 10
        needles = [basis.astype("<f8").tobytes()[:32], basis.astype("<f4").tobytes()[:16],
                   json.dumps(basis.tolist()[0])[:40].encode(), secret.read_bytes()[:60]]
        with redis.Redis.from_url(redis_url) as r:
            values = []
            for k in r.scan_iter(count=1000):
                t = r.type(k)
                if t == b"string":
                    values.append(r.get(k) or b"")
                elif t == b"hash":
                    values += list(r.hgetall(k).values())
        text = "\n".join(rec.getMessage() for rec in caplog.records).encode()
        for blob in [*payloads, *values, text]:
            for needle in needles:
                assert needle not in blob
        assert not any(b'"basis"' in p for p in payloads)

        # The operator's view of the cohort: `sidetune fleet cohorts`
        from sidetune.cli import main

        conf = tmp_path / "server.toml"
        conf.write_text(f'redis_url = "{redis_url}"\ncohorts_file = "{registry}"\n')
        capsys.readouterr()
        assert main(["fleet", "cohorts", "--config", str(conf), "--json"]) == 0
        (view,) = json.loads(capsys.readouterr().out)
        assert view["cohort"] == "press" and view["adapter_version"] == 2 and view["metrics"]["samples"] == 300
        assert view["samples_pooled"] == {a: 150, b: 150, late: 0} and view["members"] == sorted([a, b, late])
        assert main(["fleet", "cohorts", "--config", str(conf)]) == 0
        assert "press" in capsys.readouterr().out
    finally:
        worker.stop()
        for d in (a, b, outsider, late, odd):
            clear_device(mqtt_client, d)


def test_the_federated_average_is_fedavg_with_capped_shares_clipping_and_noise():
    from side_server.federated import average, epsilon

    cur = {"w": np.zeros(4, np.float32)}
    d1, d2 = {"w": np.array([1.0, 0, 0, 0])}, {"w": np.array([0, 3.0, 0, 0])}
    np.testing.assert_allclose(average(cur, [d1, d2], [100, 300], max_share=1.0)["w"], [0.25, 2.25, 0, 0])
    np.testing.assert_allclose(average(cur, [d1, d2], [100, 300], max_share=0.0)["w"], [0.5, 1.5, 0, 0])
    # clipped to norm 1: the second member's change shrinks to a third
    np.testing.assert_allclose(average(cur, [d1, d2], [1, 1], max_share=0.0, clip=1.0)["w"], [0.5, 0.5, 0, 0])
    noisy = average(cur, [d1, d2], [1, 1], max_share=0.0, clip=1.0, noise_multiplier=1.0,
                    rng=np.random.default_rng(0))["w"]
    assert not np.allclose(noisy, [0.5, 0.5, 0, 0])
    assert epsilon(0.0, 3) == float("inf") and epsilon(2.0, 1) < epsilon(2.0, 10) < epsilon(1.0, 10)


@pytest.mark.integration
def test_federated_members_send_only_weight_changes_and_get_their_average(tmp_path, tiny_backbone, mosquitto,
                                                                          redis_url, broker_accounts,
                                                                          device_accounts, mqtt_client):
    from edge_agent.agent import EdgeAgent
    from schemas import decode, decode_weights
    from schemas.sidenet import init_weights
    from schemas.updates import WeightUpdate
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
        write_jsonl,
    )

    (a, pa), (b, pb) = device_accounts(2)
    registry, secret = _cohort(tmp_path, "line", [a, b])
    uplinks, lock = _spy(mqtt_client, [a, b])
    holdout = write_jsonl(tmp_path / "holdout.jsonl", make_samples(200, seed=99))

    def member(device: str, password: str):
        return edge_settings(tmp_path, tiny_backbone, mosquitto, device, password, holdout_file=holdout,
                             cohort="line", cohort_secret_file=secret, pool="weights", federated_rounds=2)

    worker = start_worker(server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER],
                                          cohorts_file=registry))
    try:
        with AgentThread(EdgeAgent(member(a, pa))) as agent_a, AgentThread(EdgeAgent(member(b, pb))) as agent_b:
            request_round(agent_a, make_samples(150, seed=1))
            wait_for(lambda: any(r["state"] == "sent" for r in agent_a.ledger.rounds()), 60, "a's update")
            request_round(agent_b, make_samples(150, seed=2))
            r_a = wait_for(lambda: round_state(agent_a, 1), 60, "a's round")
            r_b = wait_for(lambda: round_state(agent_b, 1), 60, "b's round")
            assert r_a["state"] == r_b["state"] == "done", (r_a, r_b)
            # two FedAvg rounds (federated_rounds = 2): v1, then v2 averaged from the boards' updates from v1
            assert agent_a.adapter.version == agent_b.adapter.version == 2
            assert agent_a.adapter.metrics["cohort_members"] == 2 and agent_a.adapter.metrics["samples"] == 300
            for k, v in agent_a.adapter.forward.w.items():
                np.testing.assert_array_equal(agent_b.adapter.forward.w[k], v)
            assert r_a["tuned_accuracy"] > r_a["zero_shot_accuracy"] + 0.1, r_a
            spec = agent_a.spec
        with lock:
            got = list(uplinks)
        kinds = {t.rsplit("/", 1)[1] for t, p in got if p}
        assert kinds == {"updates", "status"}, kinds  # no job, no target, no activation left either board
        updates = [decode(t, p) for t, p in got if t.endswith("/updates")]
        assert all(isinstance(u, WeightUpdate) for u in updates)
        assert sorted((u.device_id, u.base_version) for u in updates) == sorted([(a, 0), (b, 0), (a, 1), (b, 1)])
        # v1 is the fresh network (seeded by the boards' hyper.seed, 0) plus the mean of the first two
        # changes, v2 is v1 plus the mean of the second two
        w = init_weights(spec, 0)
        for base in (0, 1):
            deltas = {u.device_id: decode_weights(u.delta, spec) for u in updates if u.base_version == base}
            w = {k: w[k] + 0.5 * (deltas[a][k] + deltas[b][k]) for k in w}
        for k, v in agent_a.adapter.forward.w.items():
            np.testing.assert_allclose(v, w[k], rtol=1e-4, atol=1e-5, err_msg=k)
    finally:
        worker.stop()
        for d in (a, b):
            clear_device(mqtt_client, d)


@pytest.mark.integration
def test_a_cohort_run_survives_a_killed_worker_and_a_redis_restart(tmp_path, tiny_backbone, mosquitto, redis_url,
                                                                   redis_server, broker_accounts, device_accounts,
                                                                   mqtt_client):
    import signal

    from edge_agent.agent import EdgeAgent
    from schemas import HyperParams
    from sidetune.services import SERVER_USER
    from tests.loop_helpers import (
        AgentThread,
        ServerProcess,
        clear_device,
        edge_settings,
        make_samples,
        request_round,
        round_state,
        server_settings,
        wait_for,
    )

    (a, pa), (b, pb) = device_accounts(2)
    registry, secret = _cohort(tmp_path, "mill", [a, b])
    settings = server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER], cohorts_file=registry,
                               worker_id="cohort-fault-1")

    def member(device: str, password: str, epochs: int):
        return edge_settings(tmp_path, tiny_backbone, mosquitto, device, password, cohort="mill", pool="activations",
                             cohort_secret_file=secret, hyper=HyperParams(epochs=epochs, lr=3e-3, batch_size=8))

    first = ServerProcess(settings, tmp_path / "w1")
    second = None
    try:
        with AgentThread(EdgeAgent(member(a, pa, 5))) as agent_a, AgentThread(EdgeAgent(member(b, pb, 80))) as agent_b:
            request_round(agent_a, make_samples(150, seed=1))
            assert wait_for(lambda: round_state(agent_a, 1), 90, "a's round")["state"] == "done"
            request_round(agent_b, make_samples(150, seed=2))
            wait_for(lambda: "trains cohort mill: 2 members" in (tmp_path / "w1" / "server.log").read_text(), 90,
                     "b's pooled run to start")
            time.sleep(1.0)  # some epochs in
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait()
            redis_server.restart()
            second = ServerProcess(settings.model_copy(update={"worker_id": "cohort-fault-2"}), tmp_path / "w2")
            r_b = wait_for(lambda: round_state(agent_b, 1), 120, "b's round after the kill and the restart")
            assert r_b["state"] == "done", r_b
            assert agent_b.adapter.metrics["samples"] == 300  # both boards' samples: nothing lost
            wait_for(lambda: agent_a.adapter.version == agent_b.adapter.version, 20, "a to get b's run")
    finally:
        first.stop()
        if second is not None:
            second.stop()
        for d in (a, b):
            clear_device(mqtt_client, d, ["cohort-fault-1", "cohort-fault-2"])


@pytest.mark.integration
def test_a_federated_average_waits_for_every_member_or_for_federated_wait(tmp_path, redis_url):
    import redis

    from schemas import encode_weights
    from schemas.adapter import AdapterUpdate
    from schemas.sidenet import init_weights
    from schemas.spec import SideNetSpec
    from schemas.updates import WeightUpdate
    from side_server.cohorts import CohortStore
    from side_server.federated import Federation

    spec = SideNetSpec(num_states=3, width=8, taps=(1, 2), bottleneck=2, out_dim=4)
    registry, _ = _cohort(tmp_path, "line", ["m-1", "m-2", "m-3"])
    sent: list[tuple[object, bool]] = []
    r = redis.Redis.from_url(redis_url)
    fed = Federation(r, CohortRegistry(registry), CohortStore(r), lambda m, retain: sent.append((m, retain)),
                     worker_id="w", max_share=0.0, wait=0.5, clip=0.0, noise_multiplier=0.0)
    ones = {k: np.ones_like(v) for k, v in init_weights(spec, 0).items()}

    def update(dev: str, job: str) -> WeightUpdate:
        return WeightUpdate(device_id=dev, job_id=job, cohort="line", backbone_fingerprint="ab" * 32, spec=spec,
                            base_version=0, samples=10, delta=encode_weights(ones, spec))

    fed.on_update(update("m-1", "fed-r1-i1-a"))
    fed.on_update(update("m-2", "fed-r1-i1-b"))
    assert not [m for m, _ in sent if isinstance(m, AdapterUpdate)]  # m-3 has sent nothing yet
    fed.due()
    assert not [m for m, _ in sent if isinstance(m, AdapterUpdate)]  # nor is the wait over
    time.sleep(0.6)
    fed._next_due = 0.0
    fed.due()
    adapters = [m for m, retain in sent if isinstance(m, AdapterUpdate) and retain]
    assert sorted(a.device_id for a in adapters) == ["m-1", "m-2", "m-3"] and {a.version for a in adapters} == {1}
    assert {a.job_id for a in adapters if a.device_id == "m-1"} == {"fed-r1-i1-a"}  # its round finishes
    # a resent update that was averaged already is answered with the adapter, not averaged again
    fed.on_update(update("m-1", "fed-r1-i1-a"))
    assert fed.fed.pending("line") == {} and CohortStore(r).version("line") == 1
    assert isinstance(sent[-1][0], AdapterUpdate) and sent[-1][0].job_id == "fed-r1-i1-a"
    r.close()
