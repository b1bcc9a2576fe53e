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
from collections import OrderedDict

import redis
import torch

from schemas.activations import ActivationBatch
from schemas.base import Message
from schemas.errors import UnavailableError, WireError
from schemas.jobs import CacheReport, Job
from schemas.progress import Progress
from schemas.spec import SideNetSpec
from schemas.status import DeviceStatus, Rejection
from schemas.topics import UPLINK_KINDS, Topic, subscription
from schemas.transport import BrokerAddress, Incoming, Transport
from schemas.updates import WeightUpdate
from schemas.wire import decode, encode
from side_server.cache import ActivationCache, CacheFull
from side_server.cohorts import CohortRegistry, CohortStore
from side_server.config import ServerSettings
from side_server.federated import Federation
from side_server.fleet import FleetLog
from side_server.inbox import FairInbox
from side_server.metrics import MetricsServer, WorkerMetrics
from side_server.outage import Outage
from side_server.pooling import Pool, TrainingSet
from side_server.quotas import SERVER_FULL, OverQuota, Rejected, check_job
from side_server.redis_client import connect
from side_server.store import JobRecord, JobStore, QuotaFull, job_digest
from side_server.training import Stats, Training

log = logging.getLogger("sidetune.server")

__all__ = ["Rejected", "Stats", "Worker"]




#: The share group every worker used before `sidetune broker init` made it a secret.
LEGACY_GROUP = "workers"
#: An ingest loop that has not turned for this long is hung (it turns every 0.2 s when idle).
STALL_SECONDS = 60.0


class Worker(Training):
    def __init__(self, settings: ServerSettings) -> None:
        self.s = settings
        self.q = settings.quotas
        self.r = connect(settings)
        self.cache = ActivationCache(self.r, settings.activation_ttl, settings.quotas.cache_bytes)
        self.store = JobStore(self.r, settings.closed_job_ttl, settings.adapters_kept)
        self.cohorts = CohortRegistry(settings.cohorts_file)  # the operator's word on membership
        self.pool = Pool(self.store, self.cache, CohortStore(self.r, settings.adapters_kept), self.cohorts,
                         worker_id=settings.worker_id, lease_seconds=settings.lease_seconds,
                         max_share=settings.cohort_max_share, max_samples=settings.cohort_max_samples)
        self.federation = Federation(self.r, self.cohorts, self.pool.cohorts, self._send, worker_id=settings.worker_id,
                                     max_share=settings.cohort_max_share, wait=settings.federated_wait,
                                     clip=settings.federated_clip, noise_multiplier=settings.federated_noise)
        self.stats = Stats()
        self.metrics = WorkerMetrics()  # served on metrics_port by start() (side_server/metrics.py)
        self.fleet = FleetLog(self.r)  # what `sidetune fleet` and the dashboard show (side_server/fleet.py)
        self.metrics_server: MetricsServer | None = None
        self._rate_unreported: dict[str, int] = {}  # quota_rate drops not yet in the fleet's counts
        self.inbox = FairInbox()  # round robin by device: one device's burst does not hold back the others
        self.stopping = threading.Event()
        self.transport = Transport(
            f"sidetune-server-{settings.worker_id}",
            BrokerAddress(settings.broker_host, settings.broker_port, settings.broker_username,
                          settings.broker_password_value(), settings.broker_ca_file),
            self.inbox.put,  # never blocks: the broker's in-flight window bounds this queue
            subscriptions=tuple(subscription(k, share_group=settings.share_group) for k in UPLINK_KINDS),
            # A device can leave a retained message on its jobs or activations topic (mosquitto
            # 2.0.11 cannot refuse it): never replay those to a (re)subscribing worker.
            no_retained=tuple(subscription(k, share_group=settings.share_group)
                              for k in ("jobs", "activations", "updates")),
            # A session resumed from before the share group became a secret still holds the old,
            # guessable group: leave it (it would get duplicates and keep the group joinable).
            drop_subscriptions=() if settings.share_group == LEGACY_GROUP else
            tuple(subscription(k, share_group=LEGACY_GROUP) for k in UPLINK_KINDS),
            manual_ack=True,
            session_expiry=settings.session_expiry,
            on_connected=self._connected,
        )
        self._reannounce = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ingest_beat = time.monotonic()
        self._loaded: OrderedDict[tuple[str, str], TrainingSet] = OrderedDict()
        self._unreleased: tuple[str, str] | None = None
        self._next_reap = 0.0

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Worker:
        torch.set_num_threads(self.s.torch_threads)
        self.r.ping()
        self.fleet.limits(self.q.cache_bytes, self.q.jobs_in_flight)
        if self.s.metrics_port:
            try:
                self.metrics_server = MetricsServer(self, self.s.metrics_host, self.s.metrics_port).start()
            except OSError as e:
                raise UnavailableError(f"cannot serve metrics on {self.s.metrics_host}:{self.s.metrics_port}: "
                                       f"{e.strerror or e}") from None
        self.transport.start()
        for target, name in ((self._ingest_loop, "ingest"), (self._train_loop, "train")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("worker %s up: broker %s:%d, redis %s%s", self.s.worker_id, self.s.broker_host,
                 self.s.broker_port, self.s.redis_url.rpartition("@")[2],
                 f", metrics on http://{self.s.metrics_host}:{self.metrics_server.port}/metrics"
                 if self.metrics_server else "")
        return self

    def stop(self) -> None:
        self.stopping.set()
        for t in self._threads:
            t.join(timeout=30)
        self.transport.stop(end_session=True)
        if self.metrics_server is not None:
            self.metrics_server.stop()
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
        outage = Outage("redis", "the ingest loop", log)  # one line when Redis goes, one when it is back
        while not self.stopping.is_set():
            self._ingest_beat = time.monotonic()
            if self._reannounce.is_set():
                try:
                    self.reannounce()
                    self._reannounce.clear()
                    outage.over()
                except redis.RedisError as e:
                    outage.failed(e)  # re-announced on a later turn
            try:
                item = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self._count_in(item)
            while not self.stopping.is_set():
                try:
                    self.handle(item)
                    outage.over()
                    break
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    # Redis down or restarting: keep the message (unacked) and try again, backing off.
                    # Anything else Redis answers (a full Redis, an error) is a rejection, never a retry.
                    self.stopping.wait(outage.failed(e))
                    self._ingest_beat = time.monotonic()  # waiting for Redis is not a hang
            else:
                return  # stopping: leave it unacknowledged, the broker redelivers it
            self.transport.ack(item.mid)

    def _count_in(self, item: Incoming) -> None:
        try:
            kind = Topic.parse(item.topic).kind
        except WireError:
            kind = "invalid"
        self.metrics.messages_in.labels(kind).inc()
        self.metrics.bytes_in.labels(kind).inc(len(item.payload))

    def handle(self, item: Incoming) -> None:
        """Handle one incoming message; every rejection is answered, nothing raises but Redis
        being unreachable (the caller keeps the message and tries again)."""
        self.stats.received += 1
        msg: Message | None = None
        try:
            if not self._within_rate(item.topic):
                return
            msg = decode(item.topic, item.payload)
            if item.retain and not isinstance(msg, DeviceStatus):
                raise Rejected("invalid", "a retained job, activations or update message is ignored: publish it live")
            if time.time() - msg.sent_at > self.s.max_message_age:
                raise Rejected("replayed", f"message sent {time.time() - msg.sent_at:.0f} s ago, older than "
                                           f"{self.s.max_message_age:.0f} s: a replay")
            if isinstance(msg, Job):
                self.on_job(msg)
            elif isinstance(msg, ActivationBatch):
                self.on_activations(msg)
            elif isinstance(msg, DeviceStatus):
                self.on_status(msg)
            elif isinstance(msg, WeightUpdate):
                self.federation.on_update(msg)
            else:
                raise Rejected("invalid", f"a {msg.KIND} message is not for the server")
        except WireError as e:
            self._reject(item.topic, e.msg_id, e.code, str(e))
        except Rejected as e:
            self._reject(item.topic, msg.msg_id if msg else None, e.code, str(e))
        except redis.OutOfMemoryError:
            self._reject(item.topic, msg.msg_id if msg else None, SERVER_FULL,
                         f"{SERVER_FULL}: the server's store is full (Redis at its maxmemory); it refuses new "
                         "work until memory frees and goes on with the jobs it holds: send again later")
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except redis.RedisError as e:  # an error answer, not an outage: retrying would not help
            log.exception("redis refused the handling of %s", item.topic[:120])
            self._reject(item.topic, msg.msg_id if msg else None, "internal", f"the server's store failed: {e}")

    def _within_rate(self, topic: str) -> bool:
        """The device's token bucket; a refusal is answered at most once a second per device."""
        try:
            device = Topic.parse(topic).device_id
        except WireError:
            return True  # decode rejects it (no device to charge)
        ok, answer = self.store.allow_message(device, self.q.messages_per_second, self.q.message_burst)
        if ok:
            return True
        self.stats.rejected += 1
        self.stats.by_code["quota_rate"] = self.stats.by_code.get("quota_rate", 0) + 1
        self.metrics.rejections.labels("quota_rate", device).inc()
        # the fleet's records count the drops with the next answered one (at most one a second)
        self._rate_unreported[device] = self._rate_unreported.get(device, 0) + 1
        if answer:
            reason = str(OverQuota("quota_rate", self.q.messages_per_second,
                                   f"more than {self.q.message_burst} messages at once; this one was dropped, "
                                   "and so are the next ones until the rate falls"))
            self._reject(topic, None, "quota_rate", reason, counted=True)
        return False

    def _reject(self, topic: str, ref: str | None, code: str, reason: str, counted: bool = False) -> None:
        if not counted:
            self.stats.rejected += 1
            self.stats.by_code[code] = self.stats.by_code.get(code, 0) + 1
        try:
            device: str | None = Topic.parse(topic).device_id
        except WireError:
            device = None
        log.info("rejected %r: %r (%s)", topic[:120], reason[:300], code, extra={"device": device})
        if not counted:
            self.metrics.rejections.labels(code, device or "").inc()
        n = self._rate_unreported.pop(device, 1) if counted and device is not None else 1
        self.fleet.rejection(device, code, reason, count=n)
        if device is None:
            return  # no device to answer
        self._send(Rejection(device_id=device, ref_topic=topic[:256], ref_msg_id=ref,
                             code=code, reason=reason[:2000]))  # type: ignore[arg-type]

    def _send(self, msg: Message, retain: bool = False) -> None:
        topic, payload = encode(msg)
        self.transport.publish(topic, payload, retain=retain)
        self.metrics.messages_out.labels(msg.KIND).inc()
        self.metrics.bytes_out.labels(msg.KIND).inc(len(payload))

    def on_status(self, msg: DeviceStatus) -> None:
        try:
            self.store.save_status(msg.device_id, {"state": msg.state, "agent_version": msg.agent_version,
                                                   "adapter_version": msg.adapter_version, "at": msg.sent_at})
        except redis.OutOfMemoryError:
            log.debug("status of %s not stored: redis is full", msg.device_id)
        self.fleet.status(msg.device_id, msg.state, msg.agent_version, msg.adapter_version, msg.backbone_fingerprint,
                          msg.sent_at, msg.last_round.model_dump() if msg.last_round is not None else None)
        cohort = self.cohorts.cohort_of(msg.device_id)
        if cohort and msg.state == "online":
            self._catch_up(msg.device_id, cohort, msg.adapter_version, msg.backbone_fingerprint)

    def _catch_up(self, device: str, cohort: str, has: int, fingerprint: str | None) -> None:
        """A member that comes online behind its cohort (it joined late, or was away) gets the
        cohort's current adapter at once (retained on its own adapter topic)."""
        update = self.pool.cohorts.current_for(cohort, device, has)
        if update is None or (fingerprint is not None and fingerprint != update.backbone_fingerprint):
            return
        log.info("member %s of cohort %s is at v%d: sending the cohort's v%d", device, cohort, has, update.version,
                 extra={"device": device})
        self._send(update, retain=True)

    def on_job(self, job: Job) -> None:
        rec = self.store.get(job.device_id, job.job_id)
        if rec is not None:
            if rec.digest != job_digest(job):
                raise Rejected("invalid", f"job id {job.job_id} was already used for a different job")
            self._answer_again(rec)
            return
        cost = check_job(self.q, job.spec, job.hyper, len(job.keys))  # before anything is stored or built
        if job.cohort is not None:
            self._check_member(job)
        elif job.base_adapter_version and self.store.adapter(job.device_id, job.base_adapter_version) is None:
            raise Rejected("invalid", f"base adapter version {job.base_adapter_version} is unknown to the server")
        missing = self.cache.missing(job.device_id, job.keys)
        try:
            created = self.store.create(job, missing, cost.records, self.q.jobs_in_flight, self.q.record_bytes)
        except QuotaFull as e:
            if e.which == "jobs":
                raise OverQuota("quota_jobs", self.q.jobs_in_flight,
                                f"the device has {e.used} jobs in flight; send this one when one finishes") from None
            raise OverQuota("quota_records", self.q.record_bytes,
                            f"the device's jobs in flight hold {e.used} bytes of records, this one needs "
                            f"{cost.records} more") from None
        if created:
            log.info("job %s/%s: %d samples, %d to upload", job.device_id, job.job_id, len(job.keys), len(missing),
                     extra={"device": job.device_id, "job": job.job_id})
            self.metrics.jobs.labels("waiting").inc()
            self.metrics.cache_hits.inc(len(job.keys) - len(missing))
            self.metrics.cache_misses.inc(len(missing))
            self.fleet.job(job.device_id, job.job_id, samples=len(job.keys), epochs=job.hyper.epochs)
            self._send(CacheReport(device_id=job.device_id, job_id=job.job_id, total=len(job.keys),
                                   missing=tuple(missing[: self._window_samples(job.spec)])))
        else:  # a twin delivery won the race
            rec = self.store.get(job.device_id, job.job_id)
            if rec is not None:
                self._answer_again(rec)

    def _check_member(self, job: Job) -> None:
        """A job for a cohort: from a member, of the cohort's task (the first member's job binds it)."""
        assert job.cohort is not None
        if self.cohorts.cohort_of(job.device_id) != job.cohort:
            raise Rejected("not_member", f"device {job.device_id} is not a member of cohort {job.cohort} (the "
                                         "operator adds it: sidetune broker set-cohort); nothing was pooled")
        why = self.pool.cohorts.bind(job.cohort, job.backbone_fingerprint, job.spec)
        if why is not None:
            raise Rejected("cohort_mismatch", f"{why}: a member's jobs must be of the cohort's task")

    def _answer_again(self, rec: JobRecord) -> None:
        """A resent job: say again what is missing (or that it is done); change nothing."""
        dev, jid, n = rec.device, rec.job_id, rec.samples
        if rec.state == "failed":
            self._send(Progress(device_id=dev, job_id=jid, state="failed",
                                detail=f"this job failed on the server ({rec.reason or 'see its log'}); "
                                       "send a new job"[:2000]))
            return
        if rec.state == "done":
            self._send(Progress(device_id=dev, job_id=jid, state="done", epoch=rec.hyper.epochs,
                                epochs=rec.hyper.epochs, samples_cached=n, samples_total=n,
                                detail=f"adapter version {rec.version} published"))
            return
        keys = self.store.keys(dev, jid)
        missing = self.cache.missing(dev, keys)
        self.store.need(dev, jid, missing)
        self._send(CacheReport(device_id=dev, job_id=jid, total=n, missing=tuple(missing[: self._window_samples(rec.spec)])))
        if not missing and rec.state == "waiting":
            # everything is cached, though a worker may have died before counting the last batch:
            # clear the need set, which marks the job ready (both idempotent)
            self.store.received(dev, jid, keys)

    def _window_samples(self, spec: SideNetSpec) -> int:
        return max(1, self.s.upload_window_bytes // (2 * len(spec.wire_rows) * spec.width))

    def _window(self, device: str, job_id: str, spec: SideNetSpec) -> tuple[str, ...]:
        """What to ask the device for now: its next ``upload_window_bytes`` of missing samples."""
        return tuple(self.store.window(device, job_id, self._window_samples(spec)))

    def on_activations(self, batch: ActivationBatch) -> None:
        dev, jid = batch.device_id, batch.job_id
        rec = self.store.get(dev, jid)
        if rec is None:
            raise Rejected("unknown_job", f"no job {jid} for device {dev}")
        if rec.closed:
            log.debug("activations for closed job %s/%s ignored", dev, jid)
            return  # a late resend: the job needs nothing more, its samples' TTLs are left alone
        if batch.backbone_fingerprint != rec.fingerprint:
            raise Rejected("spec_mismatch", "activations come from another backbone than the job's")
        want = (len(rec.spec.wire_rows), rec.spec.width)  # every pivot state, or the taps only
        if tuple(batch.states.shape[1:]) != want:
            raise Rejected("spec_mismatch", f"states have shape {list(batch.states.shape[1:])} per sample, "
                                            f"the job's spec needs {list(want)}")
        stray = self.store.stray(dev, jid, batch.keys)
        if stray:
            raise Rejected("invalid", f"{len(stray)} keys of this batch are not in job {jid}")
        try:
            self.cache.put_batch(dev, batch.keys, batch.states)
        except CacheFull as e:
            raise OverQuota("quota_cache", self.q.cache_bytes,
                            f"the device has {e.used} bytes of activations cached, this batch needs {e.batch} more; "
                            "nothing of it was stored") from None
        self.stats.samples_cached += len(batch.keys)
        self.metrics.samples_cached.inc(len(batch.keys))
        left = self.store.received(dev, jid, batch.keys)
        if left < 0:
            return  # closed meanwhile
        if left and left + len(batch.keys) > self._window_samples(rec.spec):  # the window moves on: ask for more
            self._send(CacheReport(device_id=dev, job_id=jid, total=rec.samples, missing=self._window(dev, jid, rec.spec)))
        self._send(Progress(device_id=dev, job_id=jid, state="waiting", samples_cached=rec.samples - left,
                            samples_total=rec.samples, epochs=rec.hyper.epochs))
