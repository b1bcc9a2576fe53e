"""Helpers for the end-to-end tests: a tiny task the tiny llama can learn, agents and workers in-process."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeSettings
from schemas.spec import HyperParams
from side_server.config import ServerSettings
from side_server.worker import Worker
from sidetune.services import SERVER_USER, Mosquitto

POS = ["good", "great", "excellent", "brilliant", "charming", "fun", "beautiful", "clever", "love", "masterpiece"]
NEG = ["bad", "terrible", "awful", "boring", "dull", "tedious", "weak", "ugly", "hate", "disaster"]
FILL = ["the", "movie", "film", "story", "acting", "was", "is", "a", "very", "really", "plot", "cast", "and", "of"]

TASK_TOML = '''name = "sentiment"
template = "Review : {text}"
classes = ["fresh", "rotten"]
verbalizers = ["positive", "negative"]
'''


def make_samples(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["fresh", "rotten"])
        # The verdict comes last: a random tiny model carries little across
        # positions, and the pivot (last token) must see what decides the label.
        words = rng.sample(FILL, 5) + [rng.choice(POS if label == "fresh" else NEG)]
        out.append({"text": " ".join(words), "label": label})
    return out


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    tmp = path.with_suffix(".part")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def edge_settings(tmp: Path, backbone: Path, mosquitto: Mosquitto, device: str, password: str,
                  **kw: object) -> EdgeSettings:
    task = tmp / "task.toml"
    task.write_text(TASK_TOML)
    base: dict[str, object] = dict(
        device_id=device, password=password, broker_port=mosquitto.port, state_dir=tmp / f"edge-{device}",
        backbone_dir=backbone, task_file=task, min_new_samples=10_000, upload_batch=32, out_dim=4, taps=[1, 2, 3, 4],
        hyper=HyperParams(epochs=15, lr=3e-3, batch_size=32), round_timeout=60.0, max_length=32,
    )
    base.update(kw)
    return EdgeSettings(**base)  # type: ignore[arg-type]


def server_settings(mosquitto: Mosquitto, redis_url: str, password: str, **kw: object) -> ServerSettings:
    base: dict[str, object] = dict(broker_port=mosquitto.port, broker_username=SERVER_USER,
                                   broker_password=password, redis_url=redis_url, lease_seconds=5.0)
    base.update(kw)
    return ServerSettings(**base)  # type: ignore[arg-type]


class AgentThread:
    """An EdgeAgent's daemon loop in a thread (as ``sidetune edge run`` runs it)."""

    def __init__(self, agent: EdgeAgent) -> None:
        self.agent = agent
        self.thread = threading.Thread(target=agent.run, daemon=True)

    def __enter__(self) -> EdgeAgent:
        self.thread.start()
        return self.agent

    def __exit__(self, *exc: object) -> None:
        self.agent.stopping.set()
        self.thread.join(timeout=30)


def wait_for(cond: Callable[[], object], timeout: float, what: str, poll: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def round_state(agent: EdgeAgent, number: int) -> dict[str, object] | None:
    for r in agent.ledger.rounds():
        if r["round"] == number and r["state"] in ("done", "failed"):
            return r
    return None


def start_worker(settings: ServerSettings) -> Worker:
    return Worker(settings).start()
