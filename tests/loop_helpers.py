"""Helpers for the integration tests.

A tiny task the tiny llama can learn, agents and workers in-process; and, for
the tests that play the device by hand, jobs and activation batches built
straight from the schemas, a raw client of a device account with the
downlinks it receives, and the cleanup a device account needs after a test.
"""

from __future__ import annotations

import json
import random
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeSettings
from schemas import (
    ActivationBatch,
    CacheReport,
    HyperParams,
    Job,
    Message,
    Progress,
    SideNetSpec,
    WireTensor,
    decode,
    encode,
    topic,
)
from sidetune.services import SERVER_USER, Mosquitto

if TYPE_CHECKING:  # the server side (torch, redis) is imported only by the tests that start one
    from side_server.config import ServerSettings
    from side_server.worker import Worker

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
        train_on="server",  # the round these tests follow goes through the server (the board's default trains alone)
    )
    base.update(kw)
    return EdgeSettings(**base)  # type: ignore[arg-type]


def server_settings(mosquitto: Mosquitto, redis_url: str, password: str, **kw: object) -> ServerSettings:
    from side_server.config import ServerSettings

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
    from side_server.worker import Worker

    return Worker(settings).start()


def request_round(agent: EdgeAgent, samples: list[dict[str, str]], file: str = "a.jsonl",
                  what: str = "the inbox to be read") -> None:
    """Drop ``samples`` into the agent's inbox, wait until it has read them all, and ask it for a round."""
    write_jsonl(agent.inbox / file, samples)
    wait_for(lambda: agent.ledger.count_new() == len(samples), 30, what)
    (agent.state_dir / "train.request").touch()


# --------------------------------------------------------------------------- the device by hand

#: The side net of the jobs built straight from the schemas (no backbone behind them).
SPEC = SideNetSpec(num_states=5, width=16, taps=(2, 4), out_dim=4)
FINGERPRINT = "ab" * 32


def make_job(device: str, n: int = 6, job_id: str | None = None, **kw: object) -> Job:
    """A job of ``n`` random keys and targets for :data:`SPEC`."""
    rng = np.random.default_rng()
    return Job(device_id=device, job_id=job_id or f"j-{uuid.uuid4().hex[:10]}", backbone_fingerprint=FINGERPRINT,
               spec=SPEC, hyper=HyperParams(epochs=2, batch_size=4), keys=tuple(secrets.token_hex(32) for _ in range(n)),
               targets=WireTensor.from_array(rng.normal(size=(n, SPEC.out_dim)), "float32"), **kw)


def make_batch(job: Job, keys: tuple[str, ...] | None = None, shape: tuple[int, int] | None = None,
               **kw: object) -> ActivationBatch:
    """Random activations for ``keys`` (all of the job's by default), of ``shape`` per sample (the spec's by default)."""
    keys = job.keys if keys is None else keys
    s, d = shape or (SPEC.num_states, SPEC.width)
    states = np.random.default_rng().normal(size=(len(keys), s, d))
    base: dict[str, object] = dict(device_id=job.device_id, job_id=job.job_id,
                                   backbone_fingerprint=job.backbone_fingerprint, keys=keys,
                                   states=WireTensor.from_array(states, "float16"))
    base.update(kw)
    return ActivationBatch(**base)  # type: ignore[arg-type]


class Downlinks:
    """Everything the server sends one device, decoded, in arrival order (live messages only).

    ``client`` (a client of the device account) is subscribed to the device's
    downlinks, and subscribed again whenever it reconnects (after a broker restart).
    """

    def __init__(self, client: Any, device: str) -> None:
        self.device = device
        self.seen: list[tuple[float, Message]] = []  # (time.monotonic() on arrival, message)
        self._cond = threading.Condition()
        subscribed = threading.Event()
        filters = [(topic(device, k), 1) for k in ("cache", "progress", "adapter", "errors")]
        client.on_message = self._on_message
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_connect = lambda c, *_: c.subscribe(filters)
        client.subscribe(filters)
        assert subscribed.wait(5), "no SUBACK for the device's downlinks"

    def _on_message(self, client: Any, userdata: object, msg: Any) -> None:
        if msg.retain or not msg.payload:  # an old retained adapter, or one being cleared
            return
        m = decode(msg.topic, msg.payload)
        with self._cond:
            self.seen.append((time.monotonic(), m))
            self._cond.notify_all()

    @property
    def messages(self) -> list[Message]:
        with self._cond:
            return [m for _, m in self.seen]

    def wait(self, pred: Callable[[Message], bool], timeout: float, what: str, start: int = 0) -> Message:
        """The first message from index ``start`` on that satisfies ``pred``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for _, m in self.seen[start:]:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; got "
                                         f"{[type(m).__name__ for _, m in self.seen[start:]]}")
                self._cond.wait(left)

    def since(self, start: int, cls: type[Message] | None = None) -> list[Message]:
        """The messages from index ``start`` on (of type ``cls`` only, if given)."""
        with self._cond:
            return [m for _, m in self.seen[start:] if cls is None or isinstance(m, cls)]

    def of(self, cls: type[Message], after: float = 0.0) -> list[Message]:
        """The messages of type ``cls`` that arrived at ``time.monotonic()`` ``after`` or later."""
        with self._cond:
            return [m for t, m in self.seen if isinstance(m, cls) and t >= after]

    def __len__(self) -> int:
        with self._cond:
            return len(self.seen)


@dataclass
class Device:
    """A raw paho client logged in as the device, and the downlinks it receives."""

    id: str
    client: Any
    down: Downlinks

    def publish(self, t: str, payload: bytes) -> None:
        info = self.client.publish(t, payload, qos=1)
        info.wait_for_publish(5)
        assert info.is_published(), f"the broker did not acknowledge the publish on {t}"

    def send(self, msg: Message) -> None:
        self.publish(*encode(msg))

    def _answered(self, kind: str, payload: bytes, cls: type[Message], job: Job, timeout: float,
                  what: str) -> Message:
        start = len(self.down)
        self.publish(topic(self.id, kind), payload)
        m = self.down.wait(lambda m: isinstance(m, cls) and m.job_id == job.job_id, timeout,  # type: ignore[attr-defined]
                           f"{what} {job.job_id}", start)
        assert isinstance(m, cls)
        return m

    def cache_report(self, payload: bytes, job: Job, timeout: float = 10.0) -> CacheReport:
        """Publish a job's payload and wait for the server's CacheReport on the job."""
        return self._answered("jobs", payload, CacheReport, job, timeout, "a CacheReport on job")  # type: ignore[return-value]

    def progress(self, payload: bytes, job: Job, timeout: float = 10.0) -> Progress:
        """Publish an activation batch's payload and wait for the server's Progress on the job."""
        return self._answered("activations", payload, Progress, job, timeout, "progress on job")  # type: ignore[return-value]

    def job_answered(self, job: Job, timeout: float = 10.0) -> CacheReport:
        """Publish a job and wait for the server's CacheReport on it."""
        return self.cache_report(encode(job)[1], job, timeout)

    def wait_until_answered(self, timeout: float = 40.0) -> None:
        """The worker subscribes in its connect callback (a server process first loads torch):
        resend a probe job until one is answered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = make_job(self.id, n=1)
            try:
                self.job_answered(probe, timeout=0.5)
                return
            except AssertionError:
                continue
        raise AssertionError("the worker never answered a probe job")


def clear_device(mqtt_client: Callable[..., Any], device: str, worker_ids: Sequence[str] = ()) -> None:
    """Leave the device account clean for the next test that uses it: no retained adapter, and no
    persistent session of the given workers (a stale member of a share group keeps taking messages)."""
    server = mqtt_client(SERVER_USER)
    server.publish(topic(device, "adapter"), b"", qos=1, retain=True).wait_for_publish(5)
    for wid in worker_ids:
        mqtt_client(SERVER_USER, client_id=f"sidetune-server-{wid}").disconnect()


class ServerProcess:
    """A real ``sidetune server`` in its own process (as systemd runs it), configured from ``settings``."""

    def __init__(self, settings: ServerSettings, workdir: Path) -> None:
        import subprocess
        import sys

        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "server.toml"
        data = settings.model_dump(mode="json", exclude_none=True)
        tables = {k: data.pop(k) for k in list(data) if isinstance(data[k], dict)}
        lines = [f"{k} = {json.dumps(v)}" for k, v in data.items()]
        for name, table in tables.items():
            lines += ["", f"[{name}]", *(f"{k} = {json.dumps(v)}" for k, v in table.items())]
        self.config.write_text("\n".join(lines) + "\n")
        self.log = workdir / "server.log"
        self._out = open(self.log, "wb")  # noqa: SIM115 (closed in stop)
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen([sys.executable, "-m", "sidetune.cli", "server", "--config", str(self.config)],
                                     stdout=self._out, stderr=subprocess.STDOUT, cwd=root)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


@contextmanager
def worker_and_device(mosquitto: Mosquitto, redis_url: str, broker_accounts: dict[str, str],
                      mqtt_client: Callable[..., Any], device_account: tuple[str, str], prefix: str,
                      *, process: Path | None = None, **kw: object) -> Iterator[tuple[Any, Device]]:
    """A worker in a share group of its own (``kw`` goes to its settings), and a :class:`Device` of
    ``device_account`` whose jobs the worker already answers; both cleaned up afterwards. With
    ``process`` (a work folder) the worker is a real ``sidetune server`` process (a
    :class:`ServerProcess`), else a :class:`Worker` in this process."""
    device, password = device_account
    wid = f"{prefix}-{uuid.uuid4().hex[:8]}"
    settings = server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER], worker_id=wid,
                               share_group=wid, **kw)
    worker: Any = ServerProcess(settings, process) if process is not None else start_worker(settings)
    try:
        client = mqtt_client(device, password)
        dev = Device(device, client, Downlinks(client, device))
        dev.wait_until_answered()
        yield worker, dev
    finally:
        worker.stop()
        clear_device(mqtt_client, device, [wid])
