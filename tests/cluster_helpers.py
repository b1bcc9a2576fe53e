"""The Redis Cluster the cluster tests run against: sidetune.redis_cluster's (the product starts the
same one for `sidetune bench fleet --cluster`), 3 masters + 3 replicas with a password."""

from __future__ import annotations

from sidetune.redis_cluster import LocalRedisCluster, Node

RedisClusterProcs = LocalRedisCluster

__all__ = ["LocalRedisCluster", "Node", "RedisClusterProcs"]
