"""The side server's settings (TOML file, then SIDETUNE_SERVER_* environment)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from schemas.settings import FileThenEnv, read_secret


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
    #: Workers with the same group share the uplinks ($share/<group>/...).
    share_group: str = "workers"
    #: Stable across restarts (the MQTT session, and the messages queued for it, belong to it).
    #: Two workers on one host need distinct ids (the systemd unit uses host-instance).
    worker_id: str = Field(default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    #: How long the broker keeps a killed worker's session (and its queued messages).
    session_expiry: int = Field(default=24 * 3600, ge=0)
    #: Cached activations live this long (Redis TTL, seconds); eviction may take them sooner.
    activation_ttl: int = Field(default=7 * 24 * 3600, gt=0)
    #: A job's lease; a worker renews it every epoch, another takes over when it lapses.
    lease_seconds: float = Field(default=30.0, gt=0)
    #: Messages older than this are rejected as replays.
    max_message_age: float = Field(default=7 * 24 * 3600, gt=0)
    torch_threads: int = Field(default=1, ge=1)
    log_level: str = "INFO"

    def broker_password_value(self) -> str:
        return read_secret(f"server account {self.broker_username}", self.broker_password,
                           self.broker_password_file, "broker-password")

    def redis_password(self) -> str | None:
        """None: use what ``redis_url`` says (a password in it, or none)."""
        cred = os.environ.get("CREDENTIALS_DIRECTORY")
        if self.redis_password_file is None and not (cred and (Path(cred) / "redis-password").is_file()):
            return None
        return read_secret("redis", "", self.redis_password_file, "redis-password")
