"""The real cohort round of ``sidetune bench cohort``: N board agents and one worker, for real.

mosquitto and redis-server as child processes (sidetune/services.py), a cohort registry and a
cohort secret written as an operator would, one `sidetune server` worker and N `sidetune edge run`
agents (one per shard) with the agent's defaults (label-DP at ε = 2 included) and ``pool`` as
asked. Every agent gets its shard in its inbox and a round is asked of each at once; when every
round is done and every board holds the cohort's last version, each board is scored with the
adapter it installed, its own calibration and the cohort's secret (``argmax(p_cal + Mᵀ·g(A))``,
the agent's own prediction) on the held-out features. Per board: bytes up and down (its ledger),
CPU seconds and peak RSS of its agent process (``wait4``, VmHWM), time from its round's start to
its final adapter.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.adapter import load as load_adapter
from edge_agent.calibration import calibrate, load_bias
from edge_agent.evaluate import probabilities
from edge_agent.ledger import Ledger
from edge_agent.secret import cohort_secret_json, load_or_create, with_cohort_basis
from edge_agent.task import TaskSpec
from schemas.errors import SidetuneError
from schemas.manifest import read_manifest
from schemas.spec import SideNetSpec
from sidetune.bench.features import TaskFeatures
from sidetune.bench.live import _vm_hwm_mb, task_toml
from sidetune.data import Review

COHORT = "bench-cohort"
#: How long the whole round may take (forward passes of every board on a 2-core machine included).
ROUND_LIMIT = 3600.0


def cohort_round(backbone_dir: Path, task: TaskSpec, shards: list[list[Review]], holdout: TaskFeatures,
                 spec: SideNetSpec, workdir: Path, *, pool: str, epochs: int, threads: int = 1,
                 progress: Any = print) -> dict[str, Any]:
    from sidetune.demo import spawn, wait_healthy, wait_inbox, write_jsonl
    from sidetune.services import SERVER_USER, Mosquitto, RedisServer, free_port, stop_groups

    workdir.mkdir(parents=True, exist_ok=True)
    boards = [f"bench-{pool[0]}{i:02d}" for i in range(len(shards))]
    accounts = {SERVER_USER: secrets.token_hex(12), **{b: secrets.token_hex(12) for b in boards}}
    broker = Mosquitto(workdir / "mosquitto", accounts).start()
    cache = RedisServer(workdir / "redis").start()
    procs: list[Any] = []
    agents: dict[str, Any] = {}
    try:
        (workdir / "cohorts.json").write_text(json.dumps({"devices": {b: COHORT for b in boards}}))
        secret = workdir / "cohort.json"  # the operator's, made off the server
        secret.write_text(cohort_secret_json(COHORT, spec.out_dim))
        metrics_port = free_port()
        conf = workdir / "server.toml"
        conf.write_text(f'metrics_port = {metrics_port}\nbroker_port = {broker.port}\nbroker_username = "{SERVER_USER}"\n'
                        f'broker_password = "{accounts[SERVER_USER]}"\nredis_url = "{cache.url}"\n'
                        f'worker_id = "bench-worker-1"\ntorch_threads = 1\nshare_group = "w-{secrets.token_hex(16)}"\n'
                        f'cohorts_file = "{workdir / "cohorts.json"}"\nfederated_wait = {ROUND_LIMIT}\n')
        procs.append(spawn(["server", "--config", str(conf)], workdir / "server.log"))
        wait_healthy(metrics_port, procs)
        (workdir / "task.toml").write_text(task_toml(task))
        states = {}
        for b, rows in zip(boards, shards):
            state = workdir / b
            (state / "inbox").mkdir(parents=True, exist_ok=True)
            bc = workdir / f"{b}.toml"
            bc.write_text(f'device_id = "{b}"\npassword = "{accounts[b]}"\nbroker_port = {broker.port}\n'
                          f'state_dir = "{state}"\nbackbone_dir = "{backbone_dir}"\ntask_file = "{workdir / "task.toml"}"\n'
                          f'threads = {threads}\nmin_new_samples = 1000000\nround_timeout = 900\n'
                          f'cohort = "{COHORT}"\ncohort_secret_file = "{secret}"\npool = "{pool}"\n'
                          f'out_dim = {spec.out_dim}\nbottleneck = {spec.bottleneck}\n\n[hyper]\nepochs = {epochs}\n')
            agents[b] = spawn(["edge", "run", "--config", str(bc)], workdir / f"{b}.log")
            write_jsonl(state / "inbox" / "round1.jsonl", rows)
            states[b] = state
        procs += list(agents.values())
        wait_inbox(states, procs)
        t0 = time.time()
        for s in states.values():
            (s / "train.request").touch()
        rows_of = _wait_all(states, procs, progress)
        version = max(int(r["adapter_version"] or 0) for r in rows_of.values())
        _wait_versions(states, version, procs)
        peaks = {b: _vm_hwm_mb(p.pid) for b, p in agents.items()}
        cpu = {}
        for b, p in agents.items():
            os.killpg(p.pid, signal.SIGTERM)
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            procs.remove(p)
            cpu[b] = ru.ru_utime + ru.ru_stime
        fingerprint = read_manifest(backbone_dir).fingerprint
        per: dict[str, dict[str, Any]] = {}
        out: dict[str, Any] = {"pool": pool, "version": version, "wall_s": time.time() - t0, "boards": per}
        for b, s in states.items():
            row = rows_of[b]
            acc = _score(s, spec, fingerprint, holdout, COHORT, secret, task.num_classes)
            per[b] = {"accuracy": acc, "bytes_up": row["bytes_up"], "bytes_down": _bytes_down(s),
                                "cpu_s": cpu[b], "peak_rss_mb": peaks[b],
                                "time_to_adapter_s": _installed_at(s, version) - float(row["started"]),
                                "forward_passes": row["forward_passes"], "samples": row["samples"]}
        accs = [v["accuracy"] for v in per.values()]
        progress(f"cohort round ({pool}): v{version} on every board in {out['wall_s']:.0f} s; accuracy mean "
                 f"{np.mean(accs):.3f}, worst {min(accs):.3f}")
        return out
    finally:
        stop_groups(procs)
        broker.stop()
        cache.stop()


def _wait_all(states: dict[str, Path], procs: list[Any], progress: Any) -> dict[str, dict[str, Any]]:
    from sidetune.demo import alive

    start, last = time.monotonic(), 0.0
    while time.monotonic() - start < ROUND_LIMIT:
        alive(procs)
        rows: dict[str, dict[str, Any] | None] = {}
        for b, s in states.items():
            led = Ledger(s / "state.db")
            try:
                rows[b] = next((r for r in led.rounds() if r["round"] == 1), None)
            finally:
                led.close()
        failed = [b for b, r in rows.items() if r is not None and r["state"] == "failed"]
        if failed:
            raise SidetuneError(f"board {failed[0]}'s round failed: {(rows[failed[0]] or {}).get('detail')}")
        if all(r is not None and r["state"] == "done" for r in rows.values()):
            return {b: r for b, r in rows.items() if r is not None}
        if time.monotonic() - last > 15:
            last = time.monotonic()
            states_ = [r["state"] if r else "forward passes" for r in rows.values()]
            progress(f"cohort round: {', '.join(f'{states_.count(x)} {x}' for x in sorted(set(states_)))} "
                     f"({time.monotonic() - start:.0f} s)")
        time.sleep(1.0)
    raise SidetuneError(f"the cohort round did not end within {ROUND_LIMIT:.0f} s")


def _current(state: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state / "adapter" / "current.json").read_text())
    except (OSError, ValueError):
        return None


def _wait_versions(states: dict[str, Path], version: int, procs: list[Any]) -> None:
    from sidetune.demo import alive

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        alive(procs)
        if all((_current(s) or {}).get("version") == version for s in states.values()):
            return
        time.sleep(0.5)
    raise SidetuneError(f"not every board installed the cohort's v{version} within 2 minutes")


def _installed_at(state: Path, version: int) -> float:
    return (state / "adapter" / "current.json").stat().st_mtime


def _bytes_down(state: Path) -> int:
    """Everything the board received: its rounds' downlinks, and the adapters pushed between them."""
    led = Ledger(state / "state.db")
    try:
        return sum(int(r["bytes_down"] or 0) for r in led.rounds()) + int(led.get_meta("bytes_between_rounds") or 0)
    finally:
        led.close()


def _score(state: Path, spec: SideNetSpec, fingerprint: str, ho: TaskFeatures, cohort: str, secret_file: Path,
           num_classes: int) -> float:
    """The board's own prediction on the held-out features: its adapter, calibration and the cohort basis."""
    adapter = load_adapter(state, spec, fingerprint)
    secret = with_cohort_basis(load_or_create(state, spec.out_dim), secret_file, cohort, spec.out_dim)
    prior = calibrate(ho.prior, load_bias(state, num_classes)).astype(np.float32)
    return float(np.mean(probabilities(prior, ho.states, adapter, secret).argmax(1) == ho.labels))
