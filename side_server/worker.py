"""One side-server worker: ingest (decode, cache, answer) and training.

Several workers share the uplinks through an MQTT v5 shared subscription and
the job state through Redis; a job is trained by the worker holding its lease.
Each incoming message is acknowledged only after it is handled, so a killed
worker's messages are delivered again, to it or to another.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import redis
import torch

from schemas.activations import ActivationBatch
from schemas.adapter import AdapterUpdate
from schemas.base import Message
from schemas.errors import SidetuneError, WireError
from schemas.jobs import CacheReport, Job
from schemas.progress import Progress
from schemas.status import DeviceStatus, Rejection
from schemas.topics import UPLINK_KINDS, Topic, subscription
from schemas.transport import BrokerAddress, Incoming, Transport, TransportError
from schemas.wire import decode, encode
from side_server.cache import ActivationCache
from side_server.config import ServerSettings
from side_server.store import JobRecord, JobStore, job_digest
from side_server.trainer import EpochReport, train

log = logging.getLogger("sidetune.server")

#: A job whose training raises this many times is failed (and the board told why).
MAX_ATTEMPTS = 3


@dataclass
class Stats:
    received: int = 0
    rejected: int = 0
    samples_cached: int = 0
    jobs_trained: int = 0
    epochs_trained: int = 0
    by_code: dict[str, int] = field(default_factory=dict)


#: An ingest loop that has not turned for this long is hung (it turns every 0.2 s when idle).
STALL_SECONDS = 60.0


class Rejected(SidetuneError):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class Worker:
    def __init__(self, settings: ServerSettings) -> None:
        self.s = settings
        extra = {} if (pw := settings.redis_password()) is None else {"password": pw}
        self.r = redis.Redis.from_url(settings.redis_url, socket_timeout=10, health_check_interval=10, **extra)
        self.cache = ActivationCache(self.r, settings.activation_ttl)
        self.store = JobStore(self.r)
        self.stats = Stats()
        self.inbox: queue.Queue[Incoming] = queue.Queue()
        self.stopping = threading.Event()
        self.transport = Transport(
            f"sidetune-server-{settings.worker_id}",
            BrokerAddress(settings.broker_host, settings.broker_port, settings.broker_username,
                          settings.broker_password_value(), settings.broker_ca_file),
            self.inbox.put,  # never blocks: the broker's in-flight window bounds this queue
            subscriptions=tuple(subscription(k, share_group=settings.share_group) for k in UPLINK_KINDS),
            manual_ack=True,
            session_expiry=settings.session_expiry,
            on_connected=self._connected,
        )
        self._reannounce = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ingest_beat = time.monotonic()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Worker:
        torch.set_num_threads(self.s.torch_threads)
        self.r.ping()
        self.transport.start()
        for target, name in ((self._ingest_loop, "ingest"), (self._train_loop, "train")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("worker %s up: broker %s:%d, redis %s", self.s.worker_id, self.s.broker_host,
                 self.s.broker_port, self.s.redis_url)
        return self

    def stop(self) -> None:
        self.stopping.set()
        for t in self._threads:
            t.join(timeout=30)
        self.transport.stop(end_session=True)
        self.r.close()

    def _connected(self, first: bool) -> None:
        """paho's thread. After a reconnect, uplinks sent while no worker was subscribed
        may be gone (mosquitto does not keep shared subscriptions across its restart):
        tell every waiting board again what is missing."""
        if not first:
            self._reannounce.set()

    def reannounce(self) -> None:
        for device, job_id in self.store.active():
            rec = self.store.get(device, job_id)
            if rec is not None and rec.state == "waiting":
                self._answer_again(rec)

    # ------------------------------------------------------------ ingest

    def health(self) -> str | None:
        """None while the worker works, else why not (systemd's watchdog and health checks read it)."""
        dead = [t.name for t in self._threads if not t.is_alive()]
        if dead:
            return f"worker thread {', '.join(dead)} died"
        if time.monotonic() - self._ingest_beat > STALL_SECONDS:
            return f"ingest loop stalled for {time.monotonic() - self._ingest_beat:.0f} s"
        return None

    def _ingest_loop(self) -> None:
        while not self.stopping.is_set():
            self._ingest_beat = time.monotonic()
            if self._reannounce.is_set():
                try:
                    self.reannounce()
                    self._reannounce.clear()
                except redis.RedisError as e:
                    log.warning("redis unavailable (%s); re-announcing later", e)
            try:
                item = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            while not self.stopping.is_set():
                try:
                    self.handle(item)
                    break
                except redis.RedisError as e:  # Redis down: keep the message (unacked) and retry
                    log.warning("redis unavailable (%s); retrying", e)
                    time.sleep(1.0)
                    self._ingest_beat = time.monotonic()  # waiting for Redis is not a hang
            else:
                return  # stopping: leave it unacknowledged, the broker redelivers it
            self.transport.ack(item.mid)

    def handle(self, item: Incoming) -> None:
        """Handle one incoming message; every rejection is answered, nothing raises."""
        self.stats.received += 1
        msg: Message | None = None
        try:
            msg = decode(item.topic, item.payload)
            if time.time() - msg.sent_at > self.s.max_message_age:
                raise Rejected("replayed", f"message sent {time.time() - msg.sent_at:.0f} s ago, older than "
                                           f"{self.s.max_message_age:.0f} s: a replay")
            if isinstance(msg, Job):
                self.on_job(msg)
            elif isinstance(msg, ActivationBatch):
                self.on_activations(msg)
            elif isinstance(msg, DeviceStatus):
                self.store.save_status(msg.device_id, {"state": msg.state, "agent_version": msg.agent_version,
                                                       "adapter_version": msg.adapter_version, "at": msg.sent_at})
            else:
                raise Rejected("invalid", f"a {msg.KIND} message is not for the server")
        except WireError as e:
            self._reject(item.topic, e.msg_id, e.code, str(e))
        except Rejected as e:
            self._reject(item.topic, msg.msg_id if msg else None, e.code, str(e))

    def _reject(self, topic: str, ref: str | None, code: str, reason: str) -> None:
        self.stats.rejected += 1
        self.stats.by_code[code] = self.stats.by_code.get(code, 0) + 1
        log.info("rejected %s: %s (%s)", topic[:120], reason, code)
        try:
            device = Topic.parse(topic).device_id
        except WireError:
            return  # no device to answer
        self._send(Rejection(device_id=device, ref_topic=topic[:256], ref_msg_id=ref, code=code,  # type: ignore[arg-type]
                             reason=reason[:2000]))

    def _send(self, msg: Message, retain: bool = False) -> None:
        topic, payload = encode(msg)
        self.transport.publish(topic, payload, retain=retain)

    def on_job(self, job: Job) -> None:
        rec = self.store.get(job.device_id, job.job_id)
        if rec is not None:
            if rec.digest != job_digest(job):
                raise Rejected("invalid", f"job id {job.job_id} was already used for a different job")
            self._answer_again(rec)
            return
        if job.base_adapter_version and self.store.adapter(job.device_id, job.base_adapter_version) is None:
            raise Rejected("invalid", f"base adapter version {job.base_adapter_version} is unknown to the server")
        missing = self.cache.missing(job.device_id, job.keys)
        if self.store.create(job, missing):
            log.info("job %s/%s: %d samples, %d to upload", job.device_id, job.job_id, len(job.keys), len(missing))
            self._send(CacheReport(device_id=job.device_id, job_id=job.job_id, total=len(job.keys),
                                   missing=tuple(missing)))
            if not missing:
                self.store.mark_ready(job.device_id, job.job_id)
        else:  # a twin delivery won the race
            rec = self.store.get(job.device_id, job.job_id)
            if rec is not None:
                self._answer_again(rec)

    def _answer_again(self, rec: JobRecord) -> None:
        """A resent job: say again what is missing (or that it is done); change nothing."""
        job = rec.job
        if rec.state == "failed":
            self._send(Progress(device_id=job.device_id, job_id=job.job_id, state="failed",
                                detail="this job failed on the server; send a new job"))
            return
        if rec.state == "done":
            self._send(Progress(device_id=job.device_id, job_id=job.job_id, state="done", epoch=job.hyper.epochs,
                                epochs=job.hyper.epochs, samples_cached=len(job.keys), samples_total=len(job.keys),
                                detail=f"adapter version {rec.version} published"))
            return
        missing = self.cache.missing(job.device_id, job.keys)
        self.store.need(job.device_id, job.job_id, missing)
        self._send(CacheReport(device_id=job.device_id, job_id=job.job_id, total=len(job.keys),
                               missing=tuple(missing)))
        if not missing and rec.state == "waiting":
            # everything is cached, though a worker may have died before counting the last batch:
            # clear the need set and mark the job ready (both idempotent)
            self.store.received(job.device_id, job.job_id, job.keys)
            self.store.mark_ready(job.device_id, job.job_id)

    def on_activations(self, batch: ActivationBatch) -> None:
        rec = self.store.get(batch.device_id, batch.job_id)
        if rec is None:
            raise Rejected("unknown_job", f"no job {batch.job_id} for device {batch.device_id}")
        job = rec.job
        if batch.backbone_fingerprint != job.backbone_fingerprint:
            raise Rejected("spec_mismatch", "activations come from another backbone than the job's")
        want = (job.spec.num_states, job.spec.width)
        if tuple(batch.states.shape[1:]) != want:
            raise Rejected("spec_mismatch", f"states have shape {list(batch.states.shape[1:])} per sample, "
                                            f"the job's spec needs {list(want)}")
        stray = set(batch.keys) - set(job.keys)
        if stray:
            raise Rejected("invalid", f"{len(stray)} keys of this batch are not in job {job.job_id}")
        self.cache.put_batch(batch.device_id, batch.keys, batch.states)
        self.stats.samples_cached += len(batch.keys)
        if rec.state in ("done", "failed"):
            return
        left = self.store.received(batch.device_id, batch.job_id, batch.keys)
        self._send(Progress(device_id=job.device_id, job_id=job.job_id, state="waiting",
                            samples_cached=len(job.keys) - left, samples_total=len(job.keys),
                            epochs=job.hyper.epochs))
        if left == 0:
            self.store.mark_ready(batch.device_id, batch.job_id)

    # ------------------------------------------------------------ training

    def _train_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                picked = None
                for dev, job_id in self.store.ready():
                    if self.store.lease(dev, job_id, self.s.worker_id, self.s.lease_seconds):
                        picked = (dev, job_id)
                        break
                if picked is None:
                    time.sleep(0.2)
                    continue
                try:
                    self.run_job(*picked)
                except (redis.RedisError, TransportError):
                    raise
                except Exception as e:  # a job that cannot train must not spin forever
                    self._job_error(picked[0], picked[1], e)
                finally:
                    self.store.release(picked[0], picked[1], self.s.worker_id)
            except (redis.RedisError, TransportError) as e:
                log.warning("redis unavailable in the training loop (%s); retrying", e)
                time.sleep(1.0)
            except Exception:
                log.exception("training loop error")
                time.sleep(1.0)

    def _job_error(self, device: str, job_id: str, error: Exception) -> None:
        attempts = self.store.failed_attempt(device, job_id)
        log.exception("job %s/%s failed (attempt %d of %d)", device, job_id, attempts, MAX_ATTEMPTS)
        if attempts >= MAX_ATTEMPTS:
            self.store.fail(device, job_id)
            self._send(Progress(device_id=device, job_id=job_id, state="failed",
                                detail=f"training failed {attempts} times: {type(error).__name__}: {error}"[:2000]))

    def run_job(self, device: str, job_id: str) -> None:
        rec = self.store.get(device, job_id)
        if rec is None or rec.state in ("done", "failed"):
            self.store.unready(device, job_id)
            return
        job = rec.job
        states, gone = self.cache.get_many(device, job.keys, job.spec.taps)
        if states is None:  # evicted or expired since: ask the board again
            log.info("job %s/%s: %d cached samples are gone; asking again", device, job_id, len(gone))
            self.store.unready(device, job_id)
            self.store.need(device, job_id, gone)
            self.store.set_state(device, job_id, "waiting")
            self._send(CacheReport(device_id=device, job_id=job_id, total=len(job.keys), missing=tuple(gone)))
            return
        self.store.set_state(device, job_id, "training")
        targets = job.targets.to_array()
        init = self.store.adapter(device, job.base_adapter_version) if job.base_adapter_version else None
        ckpt = self.store.checkpoint(device, job_id)
        t0 = time.perf_counter()

        def on_epoch(rep: EpochReport, blob: bytes) -> bool:
            self.stats.epochs_trained += 1
            if self.stopping.is_set() or not self.store.renew(device, job_id, self.s.worker_id, self.s.lease_seconds):
                return False
            self.store.save_checkpoint(device, job_id, blob)
            self._send(Progress(device_id=device, job_id=job_id, state="training", epoch=rep.epoch,
                                epochs=job.hyper.epochs, train_loss=rep.train_loss, val_loss=rep.val_loss,
                                samples_cached=len(job.keys), samples_total=len(job.keys)))
            return True

        net, reports = train(job.spec, job.hyper, states, targets, init_weights=init, checkpoint=ckpt,
                             on_epoch=on_epoch)
        last = reports[-1].epoch if reports else (job.hyper.epochs if ckpt else 0)
        if last < job.hyper.epochs:
            log.info("job %s/%s paused at epoch %d (lease lost or stopping)", device, job_id, last)
            return
        version = self.store.assign_version(device, job_id)
        weights = net.to_weights()
        self.store.save_adapter(device, version, weights)
        metrics: dict[str, float] = {"train_seconds": time.perf_counter() - t0, "samples": float(len(job.keys))}
        if reports:
            metrics["train_loss"] = reports[-1].train_loss
            if reports[-1].val_loss is not None:
                metrics["val_loss"] = reports[-1].val_loss
        gates = net.gates()
        if gates:
            metrics["mean_gate"] = float(np.mean(gates))
        self._send(AdapterUpdate(device_id=device, job_id=job_id, version=version,
                                 base_version=job.base_adapter_version, backbone_fingerprint=job.backbone_fingerprint,
                                 spec=job.spec, weights=weights, metrics=metrics), retain=True)
        self.store.finish(device, job_id)
        self.stats.jobs_trained += 1
        self._send(Progress(device_id=device, job_id=job_id, state="done", epoch=job.hyper.epochs,
                            epochs=job.hyper.epochs, train_loss=metrics.get("train_loss"),
                            val_loss=metrics.get("val_loss"), samples_cached=len(job.keys),
                            samples_total=len(job.keys), detail=f"adapter version {version} published"))
        log.info("job %s/%s done: adapter v%d in %.1f s", device, job_id, version, metrics["train_seconds"])
