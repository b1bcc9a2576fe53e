"""``sidetune edge run|train|status|predict --config FILE``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from edge_agent.config import EdgeSettings
from schemas.errors import SidetuneError
from schemas.settings import ConfigError, load_settings
from schemas.transport import TransportError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_CONFIG = 0, 1, 2, 69, 78


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(EdgeSettings, args.config)
    except ConfigError as e:
        print(f"sidetune edge: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cmd = args.edge_cmd
    if cmd == "train":
        Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
        (Path(settings.state_dir) / "train.request").touch()
        print(f"round requested; the agent {settings.device_id} starts it within a second")
        return EXIT_OK
    if cmd == "status":
        from edge_agent.ledger import Ledger

        db = Path(settings.state_dir) / "state.db"
        if not db.exists():
            print(f"sidetune edge: no state yet in {settings.state_dir}", file=sys.stderr)
            return EXIT_USAGE
        ledger = Ledger(db)
        print(json.dumps({"device_id": settings.device_id, "new_samples": ledger.count_new(),
                          "outbox": ledger.outbox_size(), "rounds": ledger.rounds()}, indent=1))
        return EXIT_OK
    try:
        return _agent_command(cmd, settings, args)
    except TransportError as e:
        print(f"sidetune edge: broker unavailable: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (SidetuneError, ValueError, OSError) as e:
        print(f"sidetune edge: {e}", file=sys.stderr)
        return EXIT_CONFIG


def _agent_command(cmd: str, settings: EdgeSettings, args: argparse.Namespace) -> int:
    from edge_agent.agent import EdgeAgent

    if cmd == "predict":
        from edge_agent.evaluate import as_probabilities, probabilities

        agent = EdgeAgent(settings, connect=False)
        f = agent.fx.extract(args.texts)
        scores = as_probabilities(probabilities(f.prior, f.states, agent.adapter, agent.secret))
        version = agent.adapter.version if agent.adapter else 0
        for text, row in zip(args.texts, scores):
            cls = agent.task.classes[int(row.argmax())]
            probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(agent.task.classes, row))
            print(f"{cls}\t[{probs}]\tadapter v{version}\t{text[:80]}")
        return EXIT_OK
    agent = EdgeAgent(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stopping.set())
    agent.run()
    return EXIT_OK
