"""``sidetune demo``: the whole product on one machine, on the real model and data.

mosquitto and redis-server run as child processes on free loopback ports
(per-device accounts and ACLs from ``broker_config/``), one side-server worker
and N edge agents run as separate ``sidetune`` processes, each agent with its
own shard of the Rotten Tomatoes snippets and its own held-out shard. Two
rounds: round 1 on each device's first samples, round 2 after fresh samples
arrive (round 1's samples then come from the server's cache).

The worker serves its Prometheus metrics (``metrics_port`` in the work folder's ``server.toml``)
and ``sidetune dashboard`` runs beside it, its URL printed at the start. With ``--keep-running``
everything stays up after the rounds (broker, Redis, worker, agents, dashboard) so a person can
look at it and run ``sidetune fleet --config WORKDIR/server.toml``, until Ctrl-C or SIGTERM stops
it all.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edge_agent.config import EdgeSettings
from edge_agent.ledger import Ledger
from edge_agent.secret import cohort_secret_json
from schemas.errors import SidetuneError, UsageError
from sidetune.data import Review, load_reviews, shards
from sidetune.services import SERVER_USER, Mosquitto, RedisServer, free_port, stop_groups

# SmolLM2-135M-Instruct's own chat format. Its pivot states separate fresh from rotten better than
# a plain "Review: {text}\nSentiment:" prompt does (README, "The demo's prompt").
TASK = '''name = "rotten-tomatoes"
template = "<|im_start|>user\\nIs the sentiment of this movie review positive or negative?\\n\\n{text}<|im_end|>\\n<|im_start|>assistant\\nThe sentiment is"
classes = ["fresh", "rotten"]
verbalizers = [" positive", " negative"]
'''
ROUND_TIMEOUT = 3600.0


#: The demo's boards are one cohort: they train one side network together.
DEMO_COHORT = "demo"

def default_home() -> Path:
    """Where exported backbones and cached features live: $SIDETUNE_HOME or ~/.cache/sidetune."""
    return Path(os.environ.get("SIDETUNE_HOME", Path.home() / ".cache" / "sidetune"))


def default_backbone_dir() -> Path:
    return default_home() / "backbones" / "smollm2-135m"


def ensure_backbone(path: Path | None) -> Path:
    """Reuse an exported backbone, or export SmolLM2-135M there on first use."""
    target = path or default_backbone_dir()
    if (target / "manifest.json").exists():
        print(f"[demo] reusing the backbone in {target}")
        return target
    if path is not None and path.exists() and any(path.iterdir()):
        raise UsageError(f"{path} is not an exported backbone (no manifest.json)")
    print(f"[demo] exporting SmolLM2-135M-Instruct to {target} (first run only, ~1 min)")
    from backbone_export import export_backbone

    export_backbone("smollm2-135m", target, progress=lambda m: print(f"[export] {m}", flush=True))
    return target


def write_jsonl(path: Path, rows: list[Review]) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text("".join(json.dumps(r.as_json()) + "\n" for r in rows))
    tmp.replace(path)  # the agent never sees a half-written file


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    f = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "sidetune.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def run_demo(args: argparse.Namespace) -> int:
    if args.devices < 1 or args.samples < 2 or args.holdout < 1 or args.epochs < 1:
        raise UsageError("--devices, --samples, --holdout and --epochs must be positive")
    signal.signal(signal.SIGTERM, _terminate)  # run the clean-up below on `kill` too, not only on Ctrl-C
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sidetune-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"[demo] working in {work}")
    reviews = load_reviews()
    data = shards(reviews, args.devices, args.samples, args.holdout)
    backbone = ensure_backbone(Path(args.backbone) if args.backbone else None)
    manifest = json.loads((backbone / "manifest.json").read_text())

    devices = [f"board-{i + 1}" for i in range(args.devices)]
    accounts = {SERVER_USER: secrets.token_hex(12), **{d: secrets.token_hex(12) for d in devices}}
    broker = Mosquitto(work / "mosquitto", accounts).start()
    cache = RedisServer(work / "redis").start()
    print(f"[demo] mosquitto on 127.0.0.1:{broker.port}, redis-server on 127.0.0.1:{cache.port}")
    procs: list[subprocess.Popen[bytes]] = []
    metrics_port = free_port()
    dash_port = free_port()
    while dash_port == metrics_port:
        dash_port = free_port()
    try:
        # The boards form a cohort, as an operator makes one: the registry the server reads, and the
        # cohort's secret made off the server and handed to each board (`sidetune cohort secret`).
        (work / "cohorts.json").write_text(json.dumps({"devices": {d: DEMO_COHORT for d in devices}}))
        cohort_secret = work / "cohort.json"
        cohort_secret.write_text(cohort_secret_json(DEMO_COHORT, EdgeSettings.model_fields["out_dim"].default))
        cohort_secret.chmod(0o600)
        server_conf = work / "server.toml"
        server_conf.write_text(
            f'broker_port = {broker.port}\nbroker_username = "{SERVER_USER}"\n'
            f'broker_password = "{accounts[SERVER_USER]}"\nredis_url = "{cache.url}"\n'
            f'worker_id = "demo-worker-1"\ntorch_threads = 1\nshare_group = "w-{secrets.token_hex(16)}"\n'
            f'metrics_port = {metrics_port}\ncohorts_file = "{work / "cohorts.json"}"\n')
        procs.append(spawn(["server", "--config", str(server_conf)], work / "server.log"))
        dash_log = work / "dashboard.log"
        procs.append(spawn(["dashboard", "--config", str(server_conf), "--port", str(dash_port)], dash_log))
        print(f"[demo] dashboard: {_dashboard_url(dash_log, procs)}  (live, read-only)")
        print(f"[demo] worker metrics: http://127.0.0.1:{metrics_port}/metrics, /healthz")
        (work / "task.toml").write_text(TASK)
        states = {}
        threads = max(1, (os.cpu_count() or 2) // args.devices)
        for dev, (_, held) in zip(devices, data):
            state = work / dev
            (state / "inbox").mkdir(parents=True, exist_ok=True)
            write_jsonl(work / f"{dev}-holdout.jsonl", held)
            conf = work / f"{dev}.toml"
            conf.write_text(
                f'device_id = "{dev}"\npassword = "{accounts[dev]}"\nbroker_port = {broker.port}\n'
                f'state_dir = "{state}"\nbackbone_dir = "{backbone}"\ntask_file = "{work / "task.toml"}"\n'
                f'holdout_file = "{work / f"{dev}-holdout.jsonl"}"\nthreads = {threads}\n'
                f'min_new_samples = 1000000\nround_timeout = 900\n'
                f'cohort = "{DEMO_COHORT}"\ncohort_secret_file = "{cohort_secret}"\n\n[hyper]\nepochs = {args.epochs}\n')
            procs.append(spawn(["edge", "run", "--config", str(conf)], work / f"{dev}.log"))
            states[dev] = state
        wait_healthy(metrics_port, procs)  # a job sent before the worker subscribed would wait for round_timeout
        first = max(1, args.samples * 5 // 8)
        results: dict[str, list[dict[str, Any]]] = {d: [] for d in devices}
        for rnd, (lo, hi) in enumerate(((0, first), (first, args.samples)), start=1):
            if hi <= lo:
                continue
            print(f"[demo] round {rnd}: {hi - lo} fresh samples per device (each device holds {hi} by its end)")
            for dev, (train, _) in zip(devices, data):
                write_jsonl(states[dev] / "inbox" / f"round{rnd}.jsonl", train[lo:hi])
            wait_inbox(states, procs)
            for dev in devices:
                (states[dev] / "train.request").touch()
            rows = follow(states, rnd, procs)
            for dev in devices:
                results[dev].append(rows[dev])
        _print_table(results)
        _print_cohort(states)
        report = {
            "backbone": {k: manifest[k] for k in ("fingerprint", "num_layers", "hidden_size")},
            "devices": [{"device_id": d, "rounds": results[d]} for d in devices],
        }
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
            print(f"[demo] wrote {args.json}")
        ok = all(r["state"] == "done" for d in devices for r in results[d])
        if args.keep_running:
            _keep_running(procs, server_conf)
        return 0 if ok else 1
    finally:
        stop_groups(procs)
        broker.stop()
        cache.stop()
        if not args.workdir and not os.environ.get("SIDETUNE_KEEP_DEMO"):
            shutil.rmtree(work, ignore_errors=True)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


class _Stop(Exception):
    """SIGTERM while everything is kept running: stop as on Ctrl-C."""


def _keep_running(procs: list[subprocess.Popen[bytes]], server_conf: Path) -> None:
    """Leave broker, Redis, worker, agents and dashboard up until Ctrl-C or SIGTERM."""
    def stop(signum: int, frame: object) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    print(f"[demo] everything keeps running: see the dashboard above, or `sidetune fleet --config {server_conf}`; "
          "Ctrl-C (or SIGTERM) stops it all", flush=True)
    try:
        while True:
            alive(procs)
            time.sleep(1.0)
    except (KeyboardInterrupt, _Stop):
        print("[demo] stopping: agents, dashboard, worker, redis-server, mosquitto", flush=True)
    finally:
        signal.signal(signal.SIGTERM, _terminate)


def wait_healthy(port: int, procs: list[subprocess.Popen[bytes]]) -> None:
    """Until the worker's /healthz says 200 (connected to the broker, subscribed, Redis answers)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        alive(procs)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise SidetuneError("the worker did not become healthy within 120 s; see server.log in the work folder")


def _dashboard_url(log: Path, procs: list[subprocess.Popen[bytes]]) -> str:
    """The URL the dashboard prints once it listens."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alive(procs)
        for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
            if line.startswith("dashboard on "):
                return line.split()[2]
        time.sleep(0.2)
    raise SidetuneError(f"the dashboard did not start within 60 s; see {log}")


def alive(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is not None:
            raise SidetuneError(f"a child process ({p.args!s:.120}) exited with "
                              f"code {p.returncode}; see its log in the work folder")


def wait_inbox(states: dict[str, Path], procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        alive(procs)
        if all((s / "state.db").exists() and not list((s / "inbox").glob("*.jsonl")) for s in states.values()):
            return
        time.sleep(0.5)
    raise SidetuneError("the agents did not read their inbox within 5 minutes")


def follow(states: dict[str, Path], rnd: int, procs: list[subprocess.Popen[bytes]],
           tag: str = "demo") -> dict[str, dict[str, Any]]:
    """Wait for every device's round ``rnd`` to end, printing progress (lines start ``[tag]``)."""
    start = time.monotonic()
    last_line = ""
    while time.monotonic() - start < ROUND_TIMEOUT:
        alive(procs)
        rows: dict[str, dict[str, Any]] = {}
        parts = []
        for dev, state in states.items():
            led = Ledger(state / "state.db")
            try:
                row = next((r for r in led.rounds() if r["round"] == rnd), None)
                new = led.count_new()
                out = led.outbox_size()
                activity = led.get_meta("activity") or f"{new} new samples"
            finally:
                led.close()
            if row is None:
                parts.append(f"{dev}: {activity}")
                continue
            rows[dev] = row
            parts.append(f"{dev}: {row['state']} (up {row['bytes_up'] / 1e6:.1f} MB, outbox {out})")
        line = f"[{tag}] round {rnd}, {time.monotonic() - start:5.0f} s: " + "; ".join(parts)
        if line.split(": ", 1)[1] != last_line:
            print(line, flush=True)
            last_line = line.split(": ", 1)[1]
        if len(rows) == len(states) and all(r["state"] in ("done", "failed") for r in rows.values()):
            return {dev: _clean(r) for dev, r in rows.items()}
        time.sleep(1.0)
    raise SidetuneError(f"round {rnd} did not finish within {ROUND_TIMEOUT:.0f} s")


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("round", "state", "samples", "new_samples", "forward_passes", "bytes_up", "bytes_down",
            "zero_shot_accuracy", "tuned_accuracy", "seconds", "adapter_version", "detail")
    out = {k: row.get(k) for k in keys}
    if out["seconds"] is not None:
        out["seconds"] = round(float(out["seconds"]), 1)
    return out


def _print_cohort(states: dict[str, Path]) -> None:
    """What each board's installed adapter was trained on: the cohort's samples, not its own alone."""
    for dev, state in states.items():
        try:
            meta = json.loads((state / "adapter" / "current.json").read_text())
        except (OSError, ValueError):
            continue
        m = meta.get("metrics", {})
        print(f"[demo] {dev}: adapter v{meta['version']} of cohort {DEMO_COHORT}, trained on "
              f"{m.get('samples', 0):.0f} samples of {m.get('cohort_members', 1):.0f} boards")


def _print_table(results: dict[str, list[dict[str, Any]]]) -> None:  # rows are plain JSON values
    head = ("device", "round", "samples", "new", "fwd passes", "MB up", "B up/new", "KB down", "zero-shot",
            "tuned", "seconds")
    print()
    print("  ".join(f"{h:>10s}" for h in head))
    for dev, rounds in results.items():
        for r in rounds:
            if r["state"] != "done":
                print(f"{dev:>10s}  {r['round']:>10}  FAILED: {r.get('detail')}")
                continue
            per_new = r["bytes_up"] / max(r["new_samples"], 1)
            cells = (dev, r["round"], r["samples"], r["new_samples"], r["forward_passes"],
                     f"{r['bytes_up'] / 1e6:.2f}", f"{per_new:.0f}", f"{r['bytes_down'] / 1e3:.1f}",
                     f"{r['zero_shot_accuracy']:.3f}", f"{r['tuned_accuracy']:.3f}", f"{r['seconds']:.0f}")
            print("  ".join(f"{c!s:>10s}" for c in cells))
    print()
