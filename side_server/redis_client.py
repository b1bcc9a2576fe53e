"""The one place a worker's Redis client is made from its settings."""

from __future__ import annotations

import redis

from side_server.config import ServerSettings

__all__ = ["connect"]


def connect(settings: ServerSettings) -> redis.Redis:
    """A client for ``settings.redis_url`` with the password from the settings' secret."""
    extra = {} if (pw := settings.redis_password()) is None else {"password": pw}
    return redis.Redis.from_url(settings.redis_url, socket_timeout=10, health_check_interval=10, **extra)
