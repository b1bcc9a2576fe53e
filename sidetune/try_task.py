"""``sidetune try``: your own task, from three files to a tuned board on this one host.

    sidetune try --task task.toml --train train.jsonl --holdout test.jsonl [--backbone DIR]
                 [--workdir DIR] [--epochs N] [--set KEY=VALUE ...] [--keep-running] [--json PATH]

It checks the task against the backbone (``sidetune task check``: verbalizers one token each, the
template's room, the texts that will be cut) and both files, then brings up what ``sidetune demo``
brings up (sidetune/services.py, sidetune/demo.py): mosquitto and redis-server as child processes
on free loopback ports, one ``sidetune server`` worker, and one board, ``sidetune edge run`` on a
board folder of its own. The board reads the training file from its inbox, runs one round with the
agent's defaults (``train_on = "board"``: the board trains alone and the worker idles; ``--set
train_on=server`` sends the round through it) and evaluates the held-out file before and after;
this prints the two accuracies, the bytes the board sent and got, and the time.

The work folder stays (``./sidetune-try`` by default)::

    board/edge.toml        the board's config; every path in it absolute
    board/edge.password    its broker password (0600)
    board/task.toml        a copy of the task;  board/holdout.jsonl  a copy of the held-out file
    board/state/           the agent's state: secret, ledger, adapter, inbox/
    board/agent.log        the agent's log
    services/              mosquitto's and Redis's folders, server.toml, server.log

The board folder keeps working after this ends: ``sidetune edge predict --config
board/edge.toml "text"`` runs the tuned board, and ``sidetune edge run --config board/edge.toml``
runs its agent (it queues its rounds while no broker answers). With ``--keep-running`` the broker,
Redis and the worker stay up (the board's agent is stopped, so the printed ``sidetune edge run``
takes over), until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from edge_agent.config import EdgeSettings
from edge_agent.task import BackboneTokenizer, TaskSpec
from schemas.errors import UsageError
from schemas.files import atomic_write, private_dir
from schemas.settings import load_settings
from sidetune.demo import alive, follow, spawn, wait_healthy
from sidetune.services import SERVER_USER, Mosquitto, RedisServer, free_port, stop_groups
from sidetune.task_cli import DEFAULT_MAX_LENGTH, check_task, fit_lines, resolve_backbone

DEVICE = "board-1"
DEFAULT_WORKDIR = "sidetune-try"


class _Stop(Exception):
    """SIGTERM: stop as on Ctrl-C (the children are stopped in ``finally``)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Stop


def say(message: str) -> None:
    print(f"[try] {message}", flush=True)


def _check_inputs(args: argparse.Namespace) -> tuple[TaskSpec, Path]:
    """The task, the backbone and both files, checked before anything starts."""
    task = TaskSpec.from_toml(args.task)  # TaskError: exit 78
    backbone = resolve_backbone(args.backbone)
    bb = BackboneTokenizer.load(backbone)
    for line in check_task(task, bb, DEFAULT_MAX_LENGTH):
        say(line)
    for path in (args.train, args.holdout):
        for line in fit_lines(
            task, bb, Path(path), DEFAULT_MAX_LENGTH
        ):  # UsageError: no usable line
            say(line)
    return task, backbone


def _board_folder(
    work: Path, args: argparse.Namespace, backbone: Path, broker_port: int, password: str
) -> Path:
    """board/: edge.toml (absolute paths), its password file, copies of the task and the held-out
    file, and the state folder with the training file in its inbox and a round requested."""
    board = private_dir(work / "board")  # texts, labels, a password: 0700, files 0600
    state = private_dir(board / "state")
    private_dir(state / "inbox")
    for src, name in ((args.task, "task.toml"), (args.holdout, "holdout.jsonl")):
        atomic_write(board / name, Path(src).read_bytes())
    pw = board / "edge.password"
    atomic_write(pw, password + "\n")
    top = {
        "device_id": DEVICE,
        "password_file": str(pw),
        "broker_host": "127.0.0.1",
        "broker_port": broker_port,
        "state_dir": str(state),
        "backbone_dir": str(backbone.resolve()),
        "task_file": str(board / "task.toml"),
        "holdout_file": str(board / "holdout.jsonl"),
        "threads": max(1, os.cpu_count() or 1),
        "round_timeout": 900.0,
    }
    top.update(args.settings["top"])
    hyper = dict(args.settings["hyper"])
    conf = board / "edge.toml"
    conf.write_text(
        "# Written by `sidetune try`; every key: deploy/edge.example.toml. The broker is the one\n"
        "# `sidetune try` started on this host (`--keep-running` keeps it up).\n"
        + "".join(f"{k} = {_toml_value(v)}\n" for k, v in top.items())
        + (
            "\n[hyper]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in hyper.items())
            if hyper
            else ""
        )
    )
    atomic_write(
        state / "inbox" / "train.jsonl", Path(args.train).read_bytes()
    )  # never half-written
    (state / "train.request").touch()  # one round on the first turn, whatever min_new_samples says
    return conf


#: What `try` itself sets in edge.toml: not for --set.
_OWN_KEYS = frozenset(
    {
        "device_id",
        "password",
        "password_file",
        "broker_host",
        "broker_port",
        "broker_ca_file",
        "state_dir",
        "backbone_dir",
        "task_file",
        "holdout_file",
    }
)


def _toml_value(v: object) -> str:
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")  # JSON has no words for them
    return json.dumps(v)


def parse_settings(pairs: list[str], epochs: int | None) -> dict[str, dict[str, Any]]:
    """``--set KEY=VALUE`` (``hyper.KEY=VALUE`` for the [hyper] table) as the board's settings,
    checked against the agent's own settings class (a bad key or value: exit 78)."""
    from pydantic import ValidationError

    from schemas import toml
    from schemas.settings import ConfigError

    top: dict[str, Any] = {}
    hyper: dict[str, Any] = {} if epochs is None else {"epochs": epochs}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UsageError(f"--set {pair!r}: expected KEY=VALUE (e.g. label_epsilon=inf)")
        if key in _OWN_KEYS:
            raise UsageError(f"--set {key}: `sidetune try` sets {key} itself")
        try:
            value = toml.loads(f"v = {raw}")["v"]  # a number, inf, true, [3, 6], "text"
        except toml.TOMLDecodeError:
            value = raw  # a bare word: a string (train_on=board)
        table, _, name = key.rpartition(".")
        if table not in ("", "hyper") or not name:
            raise UsageError(f"--set {key}: a key of edge.toml, or hyper.KEY")
        (hyper if table else top)[name] = value
    probe: dict[str, Any] = {
        "device_id": DEVICE,
        "state_dir": "s",
        "backbone_dir": "b",
        "task_file": "t",
        **top,
        **({"hyper": hyper} if hyper else {}),
    }
    try:
        EdgeSettings.model_validate(probe)
    except ValidationError as e:
        why = "; ".join(
            f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"--set: {why}") from None
    return {"top": top, "hyper": hyper}


def _server_conf(
    services: Path, broker: Mosquitto, cache: RedisServer, password: str
) -> tuple[Path, int]:
    metrics_port = free_port()
    conf = services / "server.toml"
    conf.write_text(
        f'broker_port = {broker.port}\nbroker_username = "{SERVER_USER}"\n'
        f'broker_password = "{password}"\nredis_url = "{cache.url}"\n'
        f'worker_id = "try-worker-1"\ntorch_threads = 1\n'
        f'share_group = "w-{secrets.token_hex(16)}"\n'
        f"metrics_port = {metrics_port}\n"
    )
    conf.chmod(0o600)
    return conf, metrics_port


def run_try(args: argparse.Namespace) -> int:
    if args.epochs is not None and args.epochs < 1:
        raise UsageError("--epochs must be positive")
    args.settings = parse_settings(args.set or [], args.epochs)
    t_start = time.monotonic()
    task, backbone = _check_inputs(args)
    work = Path(args.workdir or DEFAULT_WORKDIR).resolve()
    if (work / "board" / "state" / "state.db").exists():
        raise UsageError(
            f"{work} holds a board from an earlier `sidetune try` already: keep running it "
            f"(`sidetune edge run --config {work / 'board' / 'edge.toml'}`), or pass another "
            "--workdir"
        )
    services = work / "services"
    services.mkdir(parents=True, exist_ok=True)
    say(f"working in {work}")
    signal.signal(signal.SIGTERM, _on_sigterm)
    accounts = {SERVER_USER: secrets.token_hex(16), DEVICE: secrets.token_hex(16)}
    procs: list[subprocess.Popen[bytes]] = []
    broker = cache = None
    try:
        broker = Mosquitto(services / "mosquitto", accounts).start()
        cache = RedisServer(services / "redis").start()
        say(f"mosquitto on 127.0.0.1:{broker.port}, redis-server on 127.0.0.1:{cache.port}")
        server_conf, metrics_port = _server_conf(services, broker, cache, accounts[SERVER_USER])
        procs.append(spawn(["server", "--config", str(server_conf)], services / "server.log"))
        wait_healthy(metrics_port, procs)  # a job sent before the worker subscribed would wait
        conf = _board_folder(work, args, backbone, broker.port, accounts[DEVICE])
        state = work / "board" / "state"
        agent = spawn(["edge", "run", "--config", str(conf)], work / "board" / "agent.log")
        procs.append(agent)
        say(f"worker up; the board's agent runs one round ({work / 'board' / 'agent.log'})")
        t_round = time.monotonic()
        row = follow({DEVICE: state}, 1, procs, tag="try")[DEVICE]
        took = {
            "round_wall_s": round(time.monotonic() - t_round, 1),
            "wall_s": round(time.monotonic() - t_start, 1),
        }
        report = _report(row, task, Path(args.holdout), took, conf)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        if row["state"] != "done":
            say(f"the round failed: {row.get('detail')}; see {work / 'board' / 'agent.log'}")
            return 1
        stop_groups([agent])  # the board folder is the user's now
        procs.remove(agent)
        _next_steps(conf, server_conf, args.keep_running)
        if args.keep_running:
            _keep_running(procs)
        return 0
    except (KeyboardInterrupt, _Stop):
        say("stopping")
        return 130
    finally:
        stop_groups(procs)
        for service in (broker, cache):
            if service is not None:
                service.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _report(
    row: dict[str, Any], task: TaskSpec, holdout: Path, took: dict[str, float], conf: Path
) -> dict[str, Any]:
    from edge_agent.inbox import parse_jsonl

    n_held = len(parse_jsonl(holdout, task.classes).good)
    out = {
        "task": task.name,
        "classes": task.num_classes,
        "edge_config": str(conf),
        "holdout_texts": n_held,
        **took,
        **row,
    }
    if row["state"] != "done":
        return out
    per = row["bytes_up"] / max(row["new_samples"] or 1, 1)
    say(
        f"held-out accuracy on {holdout.name} ({n_held} texts, {task.num_classes} classes): "
        f"{row['zero_shot_accuracy']:.3f} before (the backbone alone), "
        f"{row['tuned_accuracy']:.3f} after (adapter v{row['adapter_version']})"
    )
    settings = load_settings(EdgeSettings, conf)
    out["train_on"], out["label_epsilon"] = settings.train_on, settings.label_epsilon
    if settings.train_on == "board":
        say(
            f'the board trained the side network itself (train_on = "board"): it sent no sample, '
            f"label or activation ({row['samples']} samples, {row['forward_passes']} forward "
            f"passes; {row['bytes_up']} B of the round's messages up, {row['bytes_down']} B down)"
        )
    else:
        say(
            f"the board sent {row['bytes_up'] / 1e6:.2f} MB ({per:,.0f} B per training sample, "
            f"{row['samples']} samples, {row['forward_passes']} forward passes; labels at "
            f"label_epsilon = {settings.label_epsilon:g}) and got {row['bytes_down'] / 1e3:.1f} KB"
        )
    say(
        f"the round took {took['round_wall_s']:.0f} s from the agent's start to the adapter "
        f"installed and evaluated (the agent's own figure: {row['seconds']:.0f} s); "
        f"{took['wall_s']:.0f} s in all, with the checks and the services' start"
    )
    return out


def _next_steps(conf: Path, server_conf: Path, keep_running: bool) -> None:
    say(f"the board folder: {conf.parent} (its config: {conf})")
    say(f'  predict:  sidetune edge predict --config {conf} "some text"')
    least = EdgeSettings.model_fields["min_new_samples"].default
    say(
        f"  run it:   sidetune edge run --config {conf}   (new samples: JSONL files into "
        f"{conf.parent / 'state' / 'inbox'}/; a round once {least} wait, or on `sidetune edge "
        f"train --config {conf}`)"
    )
    if keep_running:
        say(
            f"  the broker, Redis and the worker keep running for it (`sidetune fleet --config "
            f"{server_conf}`)"
        )
    else:
        say(
            "  its broker is stopped now: `sidetune edge run` queues the board's rounds until a "
            "broker answers (`sidetune try --keep-running` keeps this one up; for a broker of your "
            "own, set broker_host, broker_port and password_file: `sidetune broker add-device` "
            "writes them)"
        )


def _keep_running(procs: list[subprocess.Popen[bytes]]) -> None:
    say("the broker, Redis and the worker keep running; Ctrl-C (or SIGTERM) stops them")
    try:
        while True:
            alive(procs)
            time.sleep(1.0)
    except (KeyboardInterrupt, _Stop):
        say("stopping: the worker, redis-server, mosquitto")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `sidetune try` to the CLI's subparsers."""
    p = sub.add_parser(
        "try",
        help="your own task on this host: broker, Redis, a worker and one board, "
        "one round, held-out accuracy before and after",
    )
    p.add_argument("--task", required=True, help="the task file (`sidetune task init` writes one)")
    p.add_argument(
        "--train", required=True, help='training JSONL: one {"text": ..., "label": ...} a line'
    )
    p.add_argument("--holdout", required=True, help="held-out JSONL, the same format")
    p.add_argument(
        "--backbone",
        default=None,
        help="an exported backbone folder (default: the demo's, if it was exported)",
    )
    p.add_argument(
        "--workdir", default=None, help=f"the work folder, kept (default ./{DEFAULT_WORKDIR})"
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default: the agent's, 20)"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a setting of the board's edge.toml, e.g. train_on=server, label_epsilon=inf, "
        "hyper.lr=0.001 (repeatable; deploy/edge.example.toml lists them)",
    )
    p.add_argument("--json", default=None, help="also write the round's figures here")
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the broker, Redis and the worker up for the board, until Ctrl-C",
    )
    p.set_defaults(func=run_try)
