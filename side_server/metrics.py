"""A worker's Prometheus metrics and health check, served on ``metrics_port`` (0: off).

``GET /metrics``  the metrics below (``prometheus_client``'s exposition, in a registry of this
                  worker's own, so several workers can run in one process);
``GET /healthz``  200 ``{"status": "ok", ...}`` while the worker is connected to the broker, Redis
                  answers and its threads are alive (:meth:`side_server.worker.Worker.health`); else 503
                  ``{"status": "unhealthy", "reason": ...}``.

Counted by this worker (labels in brackets):

* ``sidetune_messages_received_total`` / ``sidetune_message_bytes_received_total`` [kind]
* ``sidetune_messages_sent_total`` / ``sidetune_message_bytes_sent_total`` [kind]
* ``sidetune_rejections_total`` [code, device]
* ``sidetune_cache_hits_total`` / ``sidetune_cache_misses_total``: samples of new jobs the cache
  held already / that the board had to upload
* ``sidetune_samples_cached_total``: samples received and cached
* ``sidetune_jobs_total`` [state]: jobs this worker created (``waiting``), finished (``done``)
  and failed (``failed``)
* ``sidetune_job_duration_seconds``: a job's creation to its end (histogram, by the worker that ends it)
* ``sidetune_epochs_trained_total``, ``sidetune_training_seconds_total``
* ``sidetune_training_loss`` / ``sidetune_training_epoch`` [device]: the job this worker trains now
* ``sidetune_inbox_messages``: messages waiting in the worker's queue (the FairInbox)
* ``sidetune_broker_connected``, ``sidetune_redis_up``: connection state (1/0)

Read from Redis at each scrape (and from the cohort registry: ``sidetune_cohort_members``
[cohort], ``sidetune_cohort_adapter_version`` [cohort]) (the same on every worker: aggregate with ``max``):

* ``sidetune_jobs`` [state]: jobs open by state (``waiting`` for uploads, ``ready`` for a worker,
  ``training``: leased)
* ``sidetune_cached_bytes`` / ``sidetune_cached_samples`` [device]
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Sized
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol, cast

import redis
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from side_server.cache import ActivationCache
    from side_server.cohorts import CohortRegistry
    from side_server.config import ServerSettings
    from side_server.pooling import Pool
    from side_server.store import JobStore


class Source(Protocol):
    """What the metrics server reads of a worker (side_server/worker.py gives all of it)."""

    s: ServerSettings
    r: Any
    store: JobStore
    cache: ActivationCache
    cohorts: CohortRegistry
    pool: Pool
    metrics: WorkerMetrics
    transport: Any

    @property
    def inbox(self) -> Sized: ...

    def health(self) -> str | None: ...

log = logging.getLogger("sidetune.server.metrics")

__all__ = ["MetricsServer", "WorkerMetrics"]


class WorkerMetrics:
    """The counters and gauges of one worker, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.messages_in = Counter("sidetune_messages_received", "Messages received, by kind (topic suffix)",
                                   ["kind"], registry=reg)
        self.bytes_in = Counter("sidetune_message_bytes_received", "Payload bytes received, by kind", ["kind"],
                                registry=reg)
        self.messages_out = Counter("sidetune_messages_sent", "Messages published, by kind", ["kind"], registry=reg)
        self.bytes_out = Counter("sidetune_message_bytes_sent", "Payload bytes published, by kind", ["kind"],
                                 registry=reg)
        self.rejections = Counter("sidetune_rejections", "Messages rejected, by code and device",
                                  ["code", "device"], registry=reg)
        self.cache_hits = Counter("sidetune_cache_hits", "Samples of new jobs already in the activation cache",
                                  registry=reg)
        self.cache_misses = Counter("sidetune_cache_misses", "Samples of new jobs the board had to upload",
                                    registry=reg)
        self.samples_cached = Counter("sidetune_samples_cached", "Samples received and cached", registry=reg)
        self.jobs = Counter("sidetune_jobs", "Jobs this worker created (waiting), finished (done) or failed",
                            ["state"], registry=reg)
        self.job_seconds = Histogram("sidetune_job_duration_seconds", "From a job's creation to its end",
                                     buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600),
                                     registry=reg)
        self.epochs = Counter("sidetune_epochs_trained", "Epochs trained", registry=reg)
        self.train_seconds = Counter("sidetune_training_seconds", "Seconds spent training (slices)", registry=reg)
        self.train_loss = Gauge("sidetune_training_loss", "Training loss of the last epoch of the job this worker "
                                "trains now", ["device"], registry=reg)
        self.train_epoch = Gauge("sidetune_training_epoch", "Epoch of the job this worker trains now", ["device"],
                                 registry=reg)
        self.inbox = Gauge("sidetune_inbox_messages", "Messages waiting in this worker's queue", registry=reg)
        self.broker_up = Gauge("sidetune_broker_connected", "1 while connected to the broker", registry=reg)

    def training(self, device: str, epoch: int, loss: float) -> None:
        self.train_loss.labels(device).set(loss)
        self.train_epoch.labels(device).set(epoch)

    def trained(self, device: str) -> None:
        """The job of ``device`` this worker trained is no longer trained here."""
        for g in (self.train_loss, self.train_epoch):
            try:
                g.remove(device)
            except KeyError:
                pass


class _FleetGauges(Collector):
    """What the scrape reads from Redis: open jobs by state, cached bytes and samples per device."""

    def __init__(self, worker: Source) -> None:
        self.w = worker

    def collect(self) -> Iterable[Any]:
        from side_server.fleet import DEVICES, STORE_ERRORS

        up = GaugeMetricFamily("sidetune_redis_up", "1 if Redis answered this scrape")
        try:
            active = self.w.store.active()
            ready = self.w.store.ready()
            leased = self.w.store.leased([(d, j) for d, j, _ in ready])
            # devices heard of within the activation TTL: no cache entry outlives it
            since = time.time() - self.w.s.activation_ttl
            known = cast(list[bytes], self.w.r.zrangebyscore(DEVICES, since, "+inf"))
            devices = sorted({d.decode() for d in known} | {d for d, _ in active})
            cached = [(d, self.w.cache.used(d), self.w.cache.samples(d)) for d in devices]
        except STORE_ERRORS:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("sidetune_jobs", "Jobs open, by state (waiting for uploads, ready for a worker, "
                                 "training)", labels=["state"])
        n_training = sum(leased)
        jobs.add_metric(["waiting"], len(active) - len(ready))
        jobs.add_metric(["ready"], len(ready) - n_training)
        jobs.add_metric(["training"], n_training)
        yield jobs
        nbytes = GaugeMetricFamily("sidetune_cached_bytes", "Bytes of activations cached, by device",
                                   labels=["device"])
        nsamples = GaugeMetricFamily("sidetune_cached_samples", "Samples in the activation cache, by device",
                                     labels=["device"])
        for d, b, s in cached:
            nbytes.add_metric([d], b)
            nsamples.add_metric([d], s)
        yield nbytes
        yield nsamples
        members = GaugeMetricFamily("sidetune_cohort_members", "Devices the operator made members of each cohort",
                                    labels=["cohort"])
        version = GaugeMetricFamily("sidetune_cohort_adapter_version", "Each cohort's latest adapter version",
                                    labels=["cohort"])
        try:
            for name, devs in self.w.cohorts.cohorts().items():
                members.add_metric([name], len(devs))
                version.add_metric([name], self.w.pool.cohorts.version(name))
        except STORE_ERRORS:
            return
        yield members
        yield version


class MetricsServer:
    """``/metrics`` and ``/healthz`` of one worker, on a thread of its own."""

    def __init__(self, worker: Source, host: str, port: int) -> None:
        self.worker = worker
        worker.metrics.inbox.set_function(lambda: len(worker.inbox))
        worker.metrics.broker_up.set_function(lambda: 1 if worker.transport.connected.is_set() else 0)
        worker.metrics.registry.register(_FleetGauges(worker))
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._answer(200, generate_latest(outer.worker.metrics.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    code, body = outer.health()
                    self._answer(code, json.dumps(body).encode() + b"\n", "application/json")
                else:
                    self._answer(404, b"not found: /metrics or /healthz\n", "text/plain; charset=utf-8")

            def _answer(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # a scrape every few seconds is not news

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    def health(self) -> tuple[int, dict[str, Any]]:
        w = self.worker
        why = None
        broker = w.transport.connected.is_set()
        try:
            w.r.ping()
            redis_ok = True
        except (redis.RedisError, redis.exceptions.RedisClusterException) as e:
            redis_ok = False
            why = f"redis unreachable: {e}"
        if not broker:
            why = "not connected to the broker" + (f"; {why}" if why else "")
        why = why or w.health()
        body: dict[str, Any] = {"status": "ok" if why is None else "unhealthy", "worker": w.s.worker_id,
                                "broker": broker, "redis": redis_ok, "inbox": len(w.inbox)}
        if why is not None:
            body["reason"] = why
        return (200 if why is None else 503), body
