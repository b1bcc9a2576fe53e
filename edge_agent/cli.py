"""``sidetune edge run|train|status|predict --config FILE``.

Errors are raised (``schemas.errors``): the ``sidetune`` command prints one line
and exits with the error's code (78 for configuration, so systemd stops).
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path
from typing import Any

from edge_agent.config import EdgeSettings
from edge_agent.presence import agent_running, read_state
from schemas.errors import ExitCode, UnavailableError, UsageError
from schemas.logs import setup_logging
from schemas.settings import load_settings


def run(args: argparse.Namespace) -> int:
    settings = load_settings(EdgeSettings, args.config)
    setup_logging(settings.log_level, settings.log_format, device=settings.device_id)
    cmd = args.edge_cmd
    if cmd == "train":
        return _train(settings)
    if cmd == "status":
        return _status(settings, as_json=args.json)
    if cmd == "predict":
        return _predict(settings, args.texts)
    from edge_agent.agent import EdgeAgent
    from edge_agent.preflight import preflight

    preflight(settings)  # a file the agent's user cannot read stops here, exit 78, naming the fix
    settings.broker_password()  # a missing or example password stops here, before the backbone loads
    agent = EdgeAgent(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stopping.set())
    agent.run()
    return ExitCode.OK


def _train(settings: EdgeSettings) -> int:
    state = Path(settings.state_dir)
    if not agent_running(state):
        raise UnavailableError(f"no agent runs on {state}: start it first (`systemctl start sidetune-edge`, "
                               f"or `sidetune edge run --config ...`)")
    (state / "train.request").touch()
    print(f"round requested: the agent {settings.device_id} (pid {read_state(state).get('pid', '?')}) starts it "
          "within a second if new samples wait (`sidetune edge status` shows it)")
    return ExitCode.OK


def status_of(settings: EdgeSettings) -> dict[str, Any]:
    from edge_agent.ledger import Ledger

    state = Path(settings.state_dir)
    db = state / "state.db"
    if not db.exists():
        raise UsageError(f"no state yet in {state}: the agent has never run with this config")
    running = agent_running(state)
    said = read_state(state)
    ledger = Ledger(db)
    try:
        rounds = ledger.rounds()
        out: dict[str, Any] = {
            "device_id": settings.device_id, "running": running, "pid": said.get("pid") if running else None,
            "connected": bool(running and said.get("connected")), "broker": f"{settings.broker_host}:{settings.broker_port}",
            "agent_version": said.get("agent_version"), "adapter_version": _installed_version(state),
            "activity": (said.get("activity") or "idle") if running else "stopped",
            "new_samples": ledger.count_new(), "outbox": ledger.outbox_size(),
            "last_round": rounds[-1] if rounds else None, "rounds": len(rounds),
            "updated": said.get("updated"),
        }
    finally:
        ledger.close()
    return out


def _installed_version(state: Path) -> int:
    try:
        return int(json.loads((state / "adapter" / "current.json").read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _status(settings: EdgeSettings, as_json: bool) -> int:
    st = status_of(settings)
    if as_json:
        print(json.dumps(st, indent=1))
        return ExitCode.OK
    run_ = f"running (pid {st['pid']})" if st["running"] else "not running"
    conn = ("connected to " if st["connected"] else "not connected to ") + st["broker"]
    print(f"agent {st['device_id']}: {run_}, {conn}")
    print(f"  adapter:  v{st['adapter_version']}" + ("" if st["adapter_version"] else " (none yet: backbone alone)"))
    print(f"  activity: {st['activity']}")
    print(f"  samples:  {st['new_samples']} new (waiting for a round); outbox: {st['outbox']} messages")
    r = st["last_round"]
    if r is None:
        print("  rounds:   none yet")
    else:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"])) if r.get("started") else "?"
        acc = (f", held-out accuracy {r['zero_shot_accuracy']:.3f} → {r['tuned_accuracy']:.3f}"
               if r.get("tuned_accuracy") is not None else "")
        print(f"  last round: #{r['round']} {r['state']} (started {when}): {r['samples']} samples, "
              f"{r['new_samples']} new, {r['forward_passes']} forward passes, {r['bytes_up']:,} B up{acc}"
              + (f" — {r['detail']}" if r.get("detail") else ""))
    return ExitCode.OK


def _predict(settings: EdgeSettings, texts: list[str]) -> int:
    from edge_agent.model import LocalModel

    model = LocalModel(settings)
    scores = model.predict(texts)
    for text, row in zip(texts, scores):
        cls = model.task.classes[int(row.argmax())]
        probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(model.task.classes, row))
        print(f"{cls}\t[{probs}]\tadapter v{model.adapter_version}\t{text[:80]}")
    return ExitCode.OK
