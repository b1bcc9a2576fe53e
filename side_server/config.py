"""The side server's settings (TOML file, then SIDETUNE_SERVER_* environment)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import SettingsConfigDict

from schemas.settings import FileThenEnv, read_secret

MiB = 1024 * 1024


class Quotas(BaseModel):
    """What one device may make the server spend (DESIGN.md §8). A message over a quota is rejected
    on the device's ``errors`` topic with the quota's code (side_server/quotas.py) and its name here;
    nothing of it is stored. The defaults fit a board that tunes on a few thousand samples of a
    SmolLM2-sized backbone, with room to spare, and let ~6 devices fill their quotas in a 2 GB Redis."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Jobs not finished (waiting, ready, training) per device. A board runs one round at a time;
    #: the rest is room for jobs it gave up on that the server has not yet closed. code quota_jobs
    jobs_in_flight: int = Field(default=16, ge=1)
    #: Samples in one job.                                                  code quota_samples
    samples_per_job: int = Field(default=20_000, ge=1)
    #: Bytes of cached activations per device (Redis value + bookkeeping). code quota_cache
    cache_bytes: int = Field(default=256 * MiB, ge=1)
    #: Bytes of job records per device: keys, targets, need sets and the checkpoint a job's
    #: spec implies, summed over its jobs in flight.                       code quota_records
    record_bytes: int = Field(default=64 * MiB, ge=1)
    #: Parameters of a job's side network.                                 code quota_sidenet
    sidenet_params: int = Field(default=20_000_000, ge=1)
    #: Memory a job's training implies (weights, gradients, AdamW state, best and checkpoint
    #: copies, the job's tapped states in float32, one batch's activations). code quota_memory
    train_memory_bytes: int = Field(default=1024 * MiB, ge=1)
    #: Epochs × samples of one job (the training work it asks for).        code quota_work
    epoch_samples: int = Field(default=2_000_000, ge=1)
    #: Messages per second per device (token bucket, refilled at this rate). code quota_rate
    messages_per_second: float = Field(default=50.0, gt=0)
    #: The bucket's size: a burst a device may send at once (a job's upload).
    message_burst: int = Field(default=2000, ge=1)


class ServerSettings(FileThenEnv):
    model_config = SettingsConfigDict(env_prefix="SIDETUNE_SERVER_", env_nested_delimiter="__", extra="forbid")

    broker_host: str = "127.0.0.1"
    broker_port: int = Field(default=1883, gt=0, lt=65536)
    broker_username: str = "sidetune-server"
    #: The server account's password: systemd's credential ``broker-password`` when the unit
    #: gives one, else ``broker_password_file``, else ``broker_password`` itself.
    broker_password_file: Path | None = None
    broker_password: str = ""
    broker_ca_file: str | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Redis's ``requirepass`` (from `sidetune broker init`): systemd's credential ``redis-password``
    #: when the unit gives one, else this file, else whatever ``redis_url`` carries.
    redis_password_file: Path | None = None
    #: Workers with the same group share the uplinks ($share/<group>/...). Keep it SECRET:
    #: mosquitto 2.0.11 lets any account subscribe to any $share/... filter, and a device in
    #: this group takes its round-robin share of every device's uplinks (which the broker then
    #: drops). `sidetune broker init` writes a generated one (w-<32 hex>) into server.toml; the
    #: default "workers" is for a broker no untrusted device can reach.
    share_group: str = "workers"
    #: Stable across restarts (the MQTT session, and the messages queued for it, belong to it).
    #: Two workers on one host need distinct ids (the systemd unit uses host-instance).
    worker_id: str = Field(default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    #: How long the broker keeps a killed worker's session (and its queued messages).
    session_expiry: int = Field(default=24 * 3600, ge=0)
    #: Cached activations live this long (Redis TTL, seconds); eviction may take them sooner.
    activation_ttl: int = Field(default=7 * 24 * 3600, gt=0)
    #: The server asks a device for its missing activations a window of about this many bytes (of
    #: fp16 states) at a time, and for the next as each batch is stored: a device's share of the
    #: broker's queue for the workers stays bounded (mosquitto drops QoS 1 messages past its
    #: max_queued_bytes, 512 MiB per worker: room for ~256 devices uploading at once per worker).
    upload_window_bytes: int = Field(default=2 * MiB, ge=1)
    #: A job's lease; a worker renews it every epoch, another takes over when it lapses.
    lease_seconds: float = Field(default=30.0, gt=0)
    #: Messages older than this are rejected as replays.
    max_message_age: float = Field(default=7 * 24 * 3600, gt=0)
    #: Per-device limits (see Quotas).
    quotas: Quotas = Quotas()
    #: Fair training: a worker trains a job for this long (seconds, checked after every optimizer
    #: step), checkpoints it and, if another device's job waits, moves on to the device served
    #: least recently. A short job waits at most about one slice per job ahead of it.
    train_slice: float = Field(default=0.5, gt=0)
    #: A job whose training was cut short this many times (its worker was killed, or training
    #: raised) is failed and its device told why, instead of being retried forever.
    max_attempts: int = Field(default=3, ge=1)
    #: A waiting job whose device has sent nothing for this long (seconds) is closed as abandoned.
    abandoned_after: float = Field(default=24 * 3600, gt=0)
    #: Finished, failed and abandoned jobs keep a small record (state, digest, adapter version)
    #: this long (seconds), so a resent job is answered rather than trained again; then it expires.
    closed_job_ttl: int = Field(default=7 * 24 * 3600, gt=0)
    #: Adapters kept per device for warm starts (the newest ones; older ones are deleted).
    adapters_kept: int = Field(default=3, ge=1)
    #: The operator's cohort registry (`sidetune broker add-device --cohort`, `set-cohort`): which
    #: devices share a task and train one side network on their pooled samples. Re-read when it
    #: changes; None: no cohorts (every device trains alone).
    cohorts_file: Path | None = None
    #: The most of a cohort's loss one member's samples may carry (0: an equal share per member):
    #: a hostile or broken member shifts the cohort's network by its share only.
    cohort_max_share: float = Field(default=0.0, ge=0.0, le=1.0)
    #: Samples one cohort training run holds at most (split evenly between the members; each keeps
    #: its newest). Bounds the run's memory like a job's ``quotas.samples_per_job``.
    cohort_max_samples: int = Field(default=20_000, ge=1)
    #: A federated cohort (members with ``pool = "weights"``) averages its members' updates once every
    #: member has sent one, or this many seconds after the first one waiting, whichever comes first.
    federated_wait: float = Field(default=300.0, gt=0)
    #: User-level DP of a federated cohort's averages: each member's update is clipped to this L2
    #: norm and Gaussian noise of ``federated_noise`` × clip × (the largest share) is added to the
    #: average (0: off; both must be set). The adapter's metrics report the ε it implies (δ = 1e-5).
    federated_clip: float = Field(default=0.0, ge=0.0)
    federated_noise: float = Field(default=0.0, ge=0.0)
    torch_threads: int = Field(default=1, ge=1)
    log_level: str = "INFO"
    #: ``text`` (journald-friendly lines) or ``json`` (one object per line: time, level, logger,
    #: message, device, job).
    log_format: Literal["text", "json"] = "text"
    #: Prometheus ``/metrics`` and ``/healthz`` of this worker on this port (0: off). Each worker
    #: on a host needs its own (the systemd unit can set SIDETUNE_SERVER_METRICS_PORT per instance).
    metrics_port: int = Field(default=0, ge=0, lt=65536)
    #: The address they listen on: loopback unless a scraper elsewhere must reach them.
    metrics_host: str = "127.0.0.1"

    def broker_password_value(self) -> str:
        return read_secret(f"server account {self.broker_username}", self.broker_password,
                           self.broker_password_file, "broker-password")

    def redis_password(self) -> str | None:
        """None: use what ``redis_url`` says (a password in it, or none)."""
        cred = os.environ.get("CREDENTIALS_DIRECTORY")
        if self.redis_password_file is None and not (cred and (Path(cred) / "redis-password").is_file()):
            return None
        return read_secret("redis", "", self.redis_password_file, "redis-password")
