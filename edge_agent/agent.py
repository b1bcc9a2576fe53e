"""The board's daemon: the main loop that ties the rooms together.

* ``model``    (model.py)   task, backbone, secret, spec, installed adapter;
* ``ingest``   (ingest.py)  inbox files → keyed samples in the ledger;
* ``rounds``   (rounds.py)  forward passes → job → uploads (upload.py) → adapter;
* ``outbox``   (outbox.py)  the ledger's queued messages → the broker, in order;
* ``presence`` (presence.py) one agent per state directory, and what it says of itself.

One main thread runs the loop; paho's thread only decodes and queues incoming
messages; the outbox thread sends what the ledger holds. A broker that is down
at start is not an error: the agent runs, keeps its outbox, and connects when it
can. Credentials the broker refuses, or a certificate that does not verify, are
(``TransportRefused``, exit 78): restarting would not fix them.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from importlib.metadata import PackageNotFoundError, version

from edge_agent.adapter import InstalledAdapter
from edge_agent.backbone import Backbone
from edge_agent.config import EdgeSettings
from edge_agent.ingest import ingest_inbox
from edge_agent.label_dp import keep_probability
from edge_agent.ledger import Ledger
from edge_agent.metrics import EdgeMetrics, figures
from edge_agent.model import LocalModel
from edge_agent.outbox import OutboxSender
from edge_agent.presence import AgentLock, write_state
from edge_agent.rounds import Round, Rounds
from edge_agent.secret import DeviceSecret
from edge_agent.task import TaskSpec
from schemas.base import Message
from schemas.errors import WireError
from schemas.spec import SideNetSpec
from schemas.status import DeviceStatus, RoundSummary
from schemas.systemd import Watchdog, notify
from schemas.topics import DOWNLINK_KINDS, topic
from schemas.transport import BrokerAddress, Incoming, Transport
from schemas.wire import decode, encode

log = logging.getLogger("sidetune.edge")


def _agent_version() -> str:
    try:
        return version("sidetune")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


__version__ = _agent_version()

TRAIN_REQUEST = "train.request"
EVENT_QUEUE = 256



def privacy_summary(s: EdgeSettings, num_classes: int) -> str:
    """One line: what this board's settings let leave it, and what that keeps of the labels."""
    if s.cohort is not None and s.pool == "weights":
        return (f"a federated member of cohort {s.cohort}: only changes of the side network's weights leave the "
                f"board ({s.federated_rounds} per round), no sample, target or label")
    if s.cohort is None and s.train_on == "board":
        return "the board trains its side network itself (train_on = \"board\"): no job, target or activation leaves it"
    where = f"pooled in cohort {s.cohort}" if s.cohort else "trained by the server"
    if math.isinf(s.label_epsilon):
        return f"{where}: labels sent as they are in mixed targets (label_epsilon = inf: no label-DP)"
    keep = keep_probability(s.label_epsilon, num_classes)
    return (f"{where}: label-DP at ε = {s.label_epsilon:g} keeps a label with probability {keep:.3f} for "
            f"{num_classes} classes ({1 - keep:.0%} of the labels sent are wrong; the more classes, the more it "
            "costs: train_on = \"board\" or a federated cohort sends no label)")

class EdgeAgent:
    def __init__(self, settings: EdgeSettings, *, connect: bool = True) -> None:
        self.s = settings
        self.model = LocalModel(settings)
        self.state_dir = self.model.state_dir
        self.inbox = self.state_dir / "inbox"
        self.inbox.mkdir(exist_ok=True)
        self.ledger = Ledger(self.state_dir / "state.db")
        self.watchdog = Watchdog()
        self.metrics = EdgeMetrics(self.state_dir, settings.metrics_port)  # <state_dir>/metrics.prom (+ a port)
        self.model.fx.on_batch = self.watchdog.pet
        # Bounded: downlinks are a handful per round plus one progress per epoch. Overflow policy:
        # the newest is dropped and logged; the round recovers (the job is sent again after
        # round_timeout of silence and the server answers again), a retained adapter comes back.
        self.events: queue.Queue[tuple[Message, int]] = queue.Queue(maxsize=EVENT_QUEUE)
        self.stopping = threading.Event()
        self.rounds = Rounds(settings, self.model, self.ledger, self._send, pet=self.watchdog.pet,
                             stopping=self.stopping, on_installed=self._announce_soon)
        self.transport: Transport | None = None
        self._connected_now = threading.Event()  # set by paho's thread on every (re)connection
        self._reconnected = threading.Event()  # ... and on every one but the first
        self.outbox: OutboxSender | None = None
        if connect:
            status_topic, offline = encode(self._status("offline"))
            self.transport = Transport(
                f"edge-{settings.device_id}",
                BrokerAddress(settings.broker_host, settings.broker_port, settings.device_id,
                              settings.broker_password(), settings.broker_ca_file),
                self._on_message,
                subscriptions=tuple(topic(settings.device_id, k) for k in DOWNLINK_KINDS),
                will=(status_topic, offline),
                on_connected=self._connected,
            )
            self.outbox = OutboxSender(self.ledger, self.transport, on_sent=self._count_up)
        self._announce = False
        self._presence: dict[str, object] = {}
        self._presence_at = float("-inf")

    # the model's parts (tools and tests read them here)
    @property
    def task(self) -> TaskSpec:
        return self.model.task

    @property
    def backbone(self) -> Backbone:
        return self.model.backbone

    @property
    def spec(self) -> SideNetSpec:
        return self.model.spec

    @property
    def secret(self) -> DeviceSecret:
        return self.model.secret

    @property
    def adapter(self) -> InstalledAdapter | None:
        return self.model.adapter

    @property
    def round(self) -> Round | None:
        return self.rounds.current

    # ------------------------------------------------------------ messages

    def _status(self, state: str) -> DeviceStatus:
        return DeviceStatus(device_id=self.s.device_id, state=state, agent_version=__version__,  # type: ignore[arg-type]
                            adapter_version=self.model.adapter_version,
                            backbone_fingerprint=self.model.backbone.fingerprint,
                            last_round=self.last_round() if state == "online" else None)

    def last_round(self) -> RoundSummary | None:
        """The last round this board finished, as its status reports it (the operator's views)."""
        done = [r for r in self.ledger.rounds() if r["state"] == "done"]
        if not done:
            return None
        r = done[-1]
        return RoundSummary(round=r["round"], samples=r["samples"] or 0, forward_passes=r["forward_passes"] or 0,
                            bytes_up=r["bytes_up"] or 0, bytes_down=r["bytes_down"] or 0,
                            seconds=max(0.0, r["seconds"] or 0.0), holdout_accuracy=r["tuned_accuracy"],
                            adapter_version=r["adapter_version"] or 0, finished_at=r["finished"] or 0.0)

    def _connected(self, first: bool) -> None:
        """paho's thread: note it; the main loop announces itself and, after a reconnect,
        asks the server again where the round stands (what was published just before a
        broker restart may not have reached a worker)."""
        if not first:
            self._reconnected.set()
        self._connected_now.set()

    def _on_message(self, item: Incoming) -> None:
        """paho's thread: decode and queue, nothing else."""
        try:
            msg = decode(item.topic, item.payload)
        except WireError as e:
            log.warning("dropped a bad message on %s: %s", item.topic, e)
            return
        try:
            self.events.put_nowait((msg, len(item.payload)))
        except queue.Full:
            log.warning("dropped a %s message: %d downlinks wait already", type(msg).__name__, EVENT_QUEUE)

    def _count_up(self, rnd: int | None, nbytes: int) -> None:
        if rnd is not None:
            self.ledger.add_round_counts(rnd, bytes_up=nbytes)

    def _send(self, items: list[tuple[str, bytes, bool]], rnd: int | None) -> None:
        self.ledger.enqueue(items, rnd)
        if self.outbox:
            self.outbox.kick()

    def _announce_soon(self) -> None:
        self._announce = True

    # ------------------------------------------------------------ daemon

    def run(self) -> None:
        assert self.transport is not None and self.outbox is not None
        lock = AgentLock(self.state_dir).acquire()
        try:
            self.transport.start(wait=False)  # a broker that is down now is retried in the background
            self.outbox.start()
            self.metrics.start()
            self.rounds.resume()
            notify("READY=1")
            log.info("edge agent %s up: backbone %s, adapter v%d, %d pending outbox messages, broker %s",
                     self.s.device_id, self.model.backbone.fingerprint[:12], self.model.adapter_version,
                     self.outbox.pending(), "connected" if self.transport.connected.is_set() else "not yet reached")
            log.info("privacy: %s", privacy_summary(self.s, self.model.task.num_classes))
            while not self.stopping.is_set():
                self.step()
                self.watchdog.pet()
            notify("STOPPING=1")
            r = self.rounds.current
            log.info("edge agent %s stopping (asked to): %s, %d outbox messages kept for the next start",
                     self.s.device_id, f"round {r.number} resumes then" if r else "no round open",
                     self.outbox.pending())
            if self.transport.connected.is_set():
                t, payload = encode(self._status("offline"))
                self.transport.publish(t, payload, retain=True)
                time.sleep(0.2)
        finally:
            self.stopping.set()
            self.outbox.stop()
            self.transport.stop()
            self._write_presence()
            self._write_metrics(force=True)
            self.metrics.stop()
            self.ledger.close()
            lock.release()
            log.info("edge agent %s stopped", self.s.device_id)

    def step(self, wait: float = 0.2) -> None:
        """One turn of the main loop (also used by tests)."""
        if self.transport is not None and self.transport.fatal is not None:
            raise self.transport.fatal  # the broker refused our credentials: exit 78, no restart loop
        ingest_inbox(self.inbox, self.model, self.ledger, self.watchdog.pet)
        try:
            msg, nbytes = self.events.get(timeout=wait)
            self.rounds.handle(msg, nbytes)
        except queue.Empty:
            pass
        if self._connected_now.is_set():
            self._connected_now.clear()
            self._announce = True
            if self._reconnected.is_set():
                self._reconnected.clear()
                if self.rounds.current is not None:
                    log.info("round %d: reconnected; asking the server where the round stands",
                             self.rounds.current.number)
                    self.rounds.resend_job()
        if self._announce and self.transport is not None and self.transport.connected.is_set():
            self._announce = False
            t, payload = encode(self._status("online"))
            self.transport.publish(t, payload, retain=True)
        if self.rounds.current is None:
            self._maybe_start_round()
        else:
            self.rounds.check_timeout()
        self._write_presence()
        self._write_metrics()

    def _write_metrics(self, force: bool = False) -> None:
        """Read the figures (every few seconds) and rewrite the metrics textfile if they changed."""
        if not (force or self.metrics.due()):
            return
        self.metrics.update(figures(
            self.ledger.rounds(), outbox=self.ledger.outbox_size(), new_samples=self.ledger.count_new(),
            adapter_version=self.model.adapter_version, forward_rate=self.rounds.forward_rate,
            connected=bool(self.transport and self.transport.connected.is_set() and not self.stopping.is_set())))

    def _write_presence(self, every: float = 60.0) -> None:
        """Rewrite ``agent.json`` when what it says changes (and once a minute): not every turn,
        since a board's SD card wears with each write."""
        r = self.rounds.current
        said = dict(device_id=self.s.device_id, agent_version=__version__,
                    connected=bool(self.transport and self.transport.connected.is_set() and not self.stopping.is_set()),
                    running=not self.stopping.is_set(), adapter_version=self.model.adapter_version,
                    round=r.number if r else None, activity=self.ledger.get_meta("activity") or "idle",
                    broker=f"{self.s.broker_host}:{self.s.broker_port}")
        now = time.monotonic()
        if said == self._presence and now - self._presence_at < every:
            return
        write_state(self.state_dir, **said)
        self._presence, self._presence_at = said, now

    # ------------------------------------------------------------ rounds

    def _maybe_start_round(self) -> None:
        request = self.state_dir / TRAIN_REQUEST
        asked = request.exists()
        if asked:
            request.unlink(missing_ok=True)
        n_new = self.ledger.count_new()
        if n_new and (asked or n_new >= self.s.min_new_samples):
            log.info("round requested (%s): %d new samples", "by `sidetune edge train`" if asked else
                     f"{n_new} ≥ min_new_samples {self.s.min_new_samples}", n_new)
            self.rounds.start()
        elif asked:
            log.info("train requested, but no new samples wait")
