"""A real round for ``sidetune bench compare``: mosquitto, redis-server, one worker and one board agent,
started as ``sidetune demo`` starts them (sidetune/services.py, sidetune/demo.py), on the task's
training samples. It gives the time from the first sample to the adapter installed on the board (the
round's ``started`` to ``finished`` in the board's ledger), the bytes the board really sent and got,
and the agent process's CPU time and peak RSS (its rusage from ``wait4`` once it is stopped).

Then the server alone: a simulated board (this process, through schemas/transport.py) sends a job and
real encoded activation batches for ``ingest_samples`` fresh keys as fast as the broker takes them;
the worker's progress messages say when every sample is decoded, checked and stored in Redis (ingest
rate) and when the adapter is trained (training rate, samples × epochs per second).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.ledger import Ledger
from edge_agent.task import TaskSpec
from schemas.activations import ActivationBatch
from schemas.adapter import AdapterUpdate
from schemas.jobs import CacheReport, Job
from schemas.progress import Progress
from schemas.spec import HyperParams, SideNetSpec
from schemas.tensors import WireTensor
from schemas.topics import topic
from schemas.transport import BrokerAddress, Incoming, Transport
from schemas.wire import decode, encode
from sidetune.data import Review

BOARD = "bench-board"
INGEST = "bench-ingest"


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def forward_phase(log: Path) -> float | None:
    """Seconds from the round's start to its job (the agent's forward passes), from the agent's log."""
    import datetime as dt

    start = end = None
    for line in log.read_text(errors="replace").splitlines():
        if "round starting:" in line or "round 1: job " in line:
            try:
                when = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
            if "round starting:" in line and start is None:
                start = when
            elif "round 1: job " in line:
                end = when
    return end - start if start is not None and end is not None else None


def task_toml(task: TaskSpec) -> str:
    d = task.to_dict()  # JSON strings are TOML basic strings
    return "".join(f"{k} = {json.dumps(v, ensure_ascii=False)}\n" for k, v in d.items())


def real_round(backbone_dir: Path, task: TaskSpec, train: list[Review], workdir: Path, *, epochs: int, threads: int,
               spec: SideNetSpec, ingest_samples: int, progress: Callable[[str], None]) -> dict[str, Any]:
    from sidetune.demo import follow, spawn, wait_healthy, wait_inbox, write_jsonl
    from sidetune.services import SERVER_USER, Mosquitto, RedisServer, free_port, stop_groups

    workdir.mkdir(parents=True, exist_ok=True)
    accounts = {SERVER_USER: secrets.token_hex(12), BOARD: secrets.token_hex(12), INGEST: secrets.token_hex(12)}
    broker = Mosquitto(workdir / "mosquitto", accounts).start()
    cache = RedisServer(workdir / "redis").start()
    progress(f"real round: mosquitto on port {broker.port}, redis-server on port {cache.port}")
    procs = []
    try:
        conf = workdir / "server.toml"
        metrics_port = free_port()
        conf.write_text(f'metrics_port = {metrics_port}\nbroker_port = {broker.port}\nbroker_username = "{SERVER_USER}"\n'
                        f'broker_password = "{accounts[SERVER_USER]}"\nredis_url = "{cache.url}"\n'
                        f'worker_id = "bench-worker-1"\ntorch_threads = 1\nshare_group = "w-{secrets.token_hex(16)}"\n')
        procs.append(spawn(["server", "--config", str(conf)], workdir / "server.log"))
        wait_healthy(metrics_port, procs)  # a job sent before the worker subscribed would wait for round_timeout
        state = workdir / BOARD
        (state / "inbox").mkdir(parents=True, exist_ok=True)
        (workdir / "task.toml").write_text(task_toml(task))
        board_conf = workdir / f"{BOARD}.toml"
        board_conf.write_text(
            f'device_id = "{BOARD}"\npassword = "{accounts[BOARD]}"\nbroker_port = {broker.port}\n'
            f'state_dir = "{state}"\nbackbone_dir = "{backbone_dir}"\ntask_file = "{workdir / "task.toml"}"\n'
            f'threads = {threads}\nmin_new_samples = 1000000\nround_timeout = 900\nlabel_epsilon = inf\n'
            'train_on = "server"\n'
            f'out_dim = {spec.out_dim}\nbottleneck = {spec.bottleneck}\n\n[hyper]\nepochs = {epochs}\n')
        agent = spawn(["edge", "run", "--config", str(board_conf)], workdir / f"{BOARD}.log")
        procs.append(agent)
        write_jsonl(state / "inbox" / "round1.jsonl", train)
        wait_inbox({BOARD: state}, procs)
        (state / "train.request").touch()
        row = follow({BOARD: state}, 1, procs)[BOARD]
        led = Ledger(state / "state.db")
        try:
            full = next(r for r in led.rounds() if r["round"] == 1)
        finally:
            led.close()
        # The agent's own peak, from the kernel, while it lives: wait4's ru_maxrss would also count the
        # memory of this process at the fork (Linux keeps the larger of the two across exec).
        peak = _vm_hwm_mb(agent.pid)
        os.killpg(agent.pid, signal.SIGTERM)
        _, status, ru = os.wait4(agent.pid, 0)
        agent.returncode = os.waitstatus_to_exitcode(status)
        procs.remove(agent)
        phase = forward_phase(workdir / f"{BOARD}.log")
        out: dict[str, Any] = {
            "agent_forward_phase_s": phase,
            "state": row["state"], "detail": row.get("detail"), "samples": row["samples"],
            "bytes_up": row["bytes_up"], "bytes_down": row["bytes_down"], "forward_passes": row["forward_passes"],
            "time_to_adapter_s": float(full["finished"]) - float(full["started"]) if full.get("finished") else None,
            "agent_cpu_s": ru.ru_utime + ru.ru_stime, "agent_peak_rss_mb": peak,
        }
        progress(f"real round: {out['state']} in {out['time_to_adapter_s'] or 0:.1f} s, agent "
                 f"{out['agent_cpu_s']:.0f} CPU-s, peak {out['agent_peak_rss_mb'] or 0:.0f} MB, "
                 f"{out['bytes_up'] / max(out['samples'], 1):.0f} B up per sample")
        if ingest_samples > 0:
            out.update(ingest(broker.port, accounts[INGEST], spec, ingest_samples, epochs, progress))
        return out
    finally:
        stop_groups(procs)
        broker.stop()
        cache.stop()


def ingest(port: int, password: str, spec: SideNetSpec, n: int, epochs: int,
           progress: Callable[[str], None], batch: int = 64) -> dict[str, Any]:
    """One worker's ingest and training rates, from real messages of a simulated board."""
    rng = np.random.default_rng(0)
    keys = tuple(secrets.token_hex(32) for _ in range(n))
    fingerprint = secrets.token_hex(32)
    rows = len(spec.wire_rows)  # the rows a board with this spec sends per sample
    states = rng.normal(size=(n, rows, spec.width)).astype(np.float16)
    job = Job(device_id=INGEST, job_id=f"ingest-{secrets.token_hex(4)}", backbone_fingerprint=fingerprint, spec=spec,
              hyper=HyperParams(epochs=epochs), keys=keys,
              targets=WireTensor.from_array(rng.normal(size=(n, spec.out_dim)).astype(np.float32), "float32"))
    batches = [encode(ActivationBatch(device_id=INGEST, job_id=job.job_id, backbone_fingerprint=fingerprint,
                                      keys=keys[i : i + batch],
                                      states=WireTensor(dtype="float16", shape=(len(keys[i : i + batch]),
                                                        rows, spec.width),
                                                        data=states[i : i + batch].tobytes())))
               for i in range(0, n, batch)]
    events: dict[str, float] = {}
    missing: list[tuple[str, ...]] = []
    done = threading.Event()

    def on_message(m: Incoming) -> None:
        msg = decode(m.topic, m.payload)
        now = time.monotonic()
        if isinstance(msg, CacheReport) and msg.job_id == job.job_id:
            missing.append(msg.missing)
            events.setdefault("cache", now)
        elif isinstance(msg, Progress) and msg.job_id == job.job_id:
            if msg.state == "waiting" and msg.samples_cached >= n:
                events.setdefault("stored", now)
            elif msg.state == "training":
                events.setdefault("stored", now)
                events.setdefault("epoch1", now)
                events["last_epoch"] = now
            elif msg.state in ("done", "failed"):
                events.setdefault("done", now)
                done.set()
        elif isinstance(msg, AdapterUpdate) and msg.job_id == job.job_id:
            events.setdefault("adapter", now)
            done.set()

    t = Transport(f"{INGEST}", BrokerAddress(port=port, username=INGEST, password=password), on_message,
                  subscriptions=tuple(topic(INGEST, k) for k in ("cache", "progress", "adapter", "errors")))
    t.start()
    try:
        jt, jp = encode(job)
        t.publish(jt, jp).wait(30)
        deadline = time.monotonic() + 60
        while "cache" not in events and time.monotonic() < deadline:
            time.sleep(0.01)
        if "cache" not in events:
            raise TimeoutError("the worker did not answer the ingest job within 60 s")
        t0 = time.monotonic()
        pubs = [t.publish(bt, bp) for bt, bp in batches]
        for p in pubs:
            p.wait(120)
        done.wait(600)
    finally:
        t.stop(end_session=True)
    stored = events.get("stored")
    finished = events.get("adapter") or events.get("done")
    rates: dict[str, Any] = {
        "ingest_samples": n,
        "ingest_samples_per_s": n / (stored - t0) if stored else None,
        "train_samples_per_s": n * epochs / (finished - stored) if stored and finished else None,
    }
    progress(f"server: ingest {rates['ingest_samples_per_s'] or 0:.0f} samples/s, training "
             f"{rates['train_samples_per_s'] or 0:.0f} samples·epochs/s ({n} samples, {epochs} epochs)")
    return rates
