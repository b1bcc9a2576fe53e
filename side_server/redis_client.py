"""The one place a worker's Redis client is made from its settings.

``redis_url`` names a single Redis (``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster:
``redis+cluster://[:password@]host:port[,host:port...]`` (``rediss+cluster://`` for TLS). For a
cluster the nodes listed are where the client starts; it learns every node and slot from them
(one reachable node is enough), and follows the cluster when a master fails over to its replica.
Every key the server writes carries its device's hash tag (side_server/store.py), so each Lua
script and pipeline of one device runs on one node; a cluster has database 0 only.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

from schemas.errors import ConfigurationError, UnavailableError
from side_server.config import ServerSettings

__all__ = ["CLUSTER_SCHEMES", "connect", "is_cluster"]

#: The URL schemes that name a Redis Cluster, and the scheme of each of its nodes.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
#: What a cluster answers while a master is failing over (or its slots are being moved): the
#: same to the worker as a Redis that is down — keep the message and try again — never a refusal.
_TRANSIENT = (ClusterDownError, ClusterError, TryAgainError, SlotNotCoveredError)


def is_cluster(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def connect(settings: ServerSettings) -> redis.Redis:
    """A client for ``settings.redis_url`` with the password from the settings' secret.

    A cluster's client (redis-py's ``RedisCluster``) answers the same commands as ``redis.Redis``
    for keys of one slot, which is all the server sends it; it is typed as one here."""
    extra: dict[str, Any] = {} if (pw := settings.redis_password()) is None else {"password": pw}
    if is_cluster(settings.redis_url):
        return cast(redis.Redis, _cluster(settings.redis_url, **extra))
    return redis.Redis.from_url(settings.redis_url, socket_timeout=10, health_check_interval=10, **extra)


def _cluster(url: str, **extra: Any) -> RedisCluster:
    scheme, _, rest = url.partition("://")
    node_scheme = CLUSTER_SCHEMES[scheme.lower()]
    userinfo, at, hosts = rest.partition("/")[0].rpartition("@")
    if not at:
        userinfo, hosts = "", rest.partition("/")[0]
    db = rest.partition("/")[2].partition("?")[0]
    if db not in ("", "0"):
        raise ConfigurationError(f"redis_url {_redacted(url)}: a Redis Cluster has database 0 only, not {db!r}")
    nodes = []
    for part in hosts.split(","):
        try:
            where = urlsplit(f"{node_scheme}://{part}")
            host, port = where.hostname, where.port or 6379
        except ValueError as e:
            raise ConfigurationError(f"redis_url {_redacted(url)}: bad node {part!r}: {e}") from None
        if not host:
            raise ConfigurationError(f"redis_url {_redacted(url)}: a node without a host")
        nodes.append(ClusterNode(host, port))
    user, _, password = userinfo.partition(":")
    if user:
        extra.setdefault("username", unquote(user))
    if password:
        extra.setdefault("password", unquote(password))
    if node_scheme == "rediss":
        extra["ssl"] = True
    try:  # a cluster client learns the cluster's nodes and slots now, not at its first command
        return _Cluster(startup_nodes=nodes, socket_timeout=10, socket_connect_timeout=5, health_check_interval=10,
                        **extra)
    except (redis.RedisError, RedisClusterException) as e:
        # redis-py wraps a refused password in the "cannot be connected" exception
        if isinstance(e, redis.AuthenticationError) or isinstance(e.__cause__, redis.AuthenticationError) \
                or "username-password" in str(e):
            raise ConfigurationError(f"redis cluster {_redacted(url)} refused the password: {e}") from None
        raise UnavailableError(f"redis cluster {_redacted(url)} unavailable: {e}") from None


def _redacted(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


class _Cluster(RedisCluster):
    """RedisCluster whose failover errors are ``redis.ConnectionError``s (the worker retries those)."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_command(*args, **kwargs)
        except _TRANSIENT as e:
            raise redis.ConnectionError(f"redis cluster unavailable: {type(e).__name__}: {e}") from e

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        pipe = super().pipeline(transaction, shard_hint)
        pipe.__class__ = _Pipeline  # the same object, whose execute maps the errors as above
        return pipe


class _Pipeline(ClusterPipeline):
    def execute(self, raise_on_error: bool = True) -> list[Any]:
        try:
            return super().execute(raise_on_error)
        except _TRANSIENT as e:
            raise redis.ConnectionError(f"redis cluster unavailable: {type(e).__name__}: {e}") from e
