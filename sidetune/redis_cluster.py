"""A Redis Cluster of child processes on loopback: the tests' (tests/test_cluster.py) and
`sidetune bench fleet --cluster`'s.

Six redis-server processes in cluster mode on free ports — broker_config/redis.conf as shipped,
plus ``cluster-enabled``, a password (``requirepass``, and ``masterauth`` so that a replica can
follow its master) — joined by ``redis-cli --cluster create ... --cluster-replicas 1``: three
masters sharing the 16384 slots, each with one replica. ``url`` is the server's
``redis+cluster://`` URL for it. A failed master is replaced by its replica after
``node_timeout`` ms (2 s here; Redis's default is 15 s).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from sidetune.services import ServiceError, find_binary, free_port, new_password, redis_settings


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 above it, so at most 65535) is free as well."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port


@dataclass
class Node:
    port: int
    state_dir: Path
    password: str
    node_timeout: int
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.state_dir / "redis.log"

    def start(self) -> Node:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        args = [find_binary("redis-server", "redis-server")]
        for key, value in redis_settings():
            args += [f"--{key}", value.strip('"')]
        args += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.state_dir),
                 "--logfile", str(self.log), "--daemonize", "no", "--protected-mode", "yes",
                 "--requirepass", self.password, "--masterauth", self.password,
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", str(self.node_timeout)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                raise ServiceError(f"redis-server (cluster node {self.port}) exited with {self.proc.returncode}:\n{tail}")
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise ServiceError(f"redis-server (cluster node {self.port}) not answering after 60 s")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)

    def info(self, section: str) -> dict[str, object]:
        with self.client() as c:
            return dict(c.info(section))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class LocalRedisCluster:
    """3 masters + 3 replicas (``masters``, ``replicas`` per master) in ``state_dir``."""

    state_dir: Path
    masters: int = 3
    replicas: int = 1
    node_timeout: int = 2000
    password: str = field(default_factory=new_password, repr=False)
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://:{self.password}@" + ",".join(n.name for n in self.nodes[: self.masters])

    def start(self) -> LocalRedisCluster:
        ports: set[int] = set()
        while len(ports) < self.masters * (1 + self.replicas):
            ports.add(_cluster_port())
        self.nodes = [Node(p, self.state_dir / f"node-{p}", self.password, self.node_timeout) for p in sorted(ports)]
        try:
            for n in self.nodes:
                n.start()
            cli = find_binary("redis-cli", "redis-tools")
            proc = subprocess.run([cli, "-a", self.password, "--no-auth-warning", "--cluster", "create",
                                   *(n.name for n in self.nodes), "--cluster-replicas", str(self.replicas),
                                   "--cluster-yes"], capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                raise ServiceError(f"redis-cli --cluster create failed: {(proc.stdout + proc.stderr)[-2000:]}")
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every running node says the cluster is ok, every slot is served, and each master
        has its replicas online."""
        deadline = time.monotonic() + timeout
        why = ""
        while time.monotonic() < deadline:
            try:
                why = self._not_ok()
            except redis.RedisError as e:
                why = str(e)
            if not why:
                return
            time.sleep(0.1)
        raise ServiceError(f"redis cluster not ok after {timeout:.0f} s: {why}")

    def _not_ok(self) -> str:
        for n in self.nodes:
            if not n.running:
                continue
            with n.client() as c:
                info = c.cluster("info")
                if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
                    return f"{n.name}: {info}"
        for m in self.masters_now():
            if m.info("replication").get("connected_slaves") != self.replicas:
                return f"{m.name}: replicas not all online"
        return ""

    def _nodes_table(self) -> list[dict[str, Any]]:
        """CLUSTER NODES as one running node sees it: id, port, flags, master (id), slots [(lo, hi)]."""
        for n in self.nodes:
            if n.running:
                with n.client() as c:
                    table = c.cluster("nodes")
                rows = []
                for addr, v in table.items():
                    slots = [(int(r[0]), int(r[-1])) for r in v.get("slots", []) if r]
                    rows.append({"id": v["node_id"], "port": int(addr.partition("@")[0].rpartition(":")[2]),
                                 "flags": v["flags"].split(","), "master": v["master_id"], "slots": slots})
                return rows
        raise ServiceError("no cluster node running")

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def masters_now(self) -> list[Node]:
        return [self.node(r["port"]) for r in self._nodes_table()
                if "master" in r["flags"] and "fail" not in r["flags"] and r["slots"]]

    def master_of(self, key: str) -> Node:
        """The master serving ``key``'s slot now."""
        with self.masters_now()[0].client() as c:
            slot = int(c.execute_command("CLUSTER KEYSLOT", key))
        for r in self._nodes_table():
            if "master" in r["flags"] and "fail" not in r["flags"]:
                if any(lo <= slot <= hi for lo, hi in r["slots"]):
                    return self.node(r["port"])
        raise ServiceError(f"no master serves slot {slot}")

    def replica_of(self, master: Node) -> Node:
        table = self._nodes_table()
        mid = next(r["id"] for r in table if r["port"] == master.port)
        return next(self.node(r["port"]) for r in table if r["master"] == mid and "fail" not in r["flags"])

    def failover(self, master: Node, timeout: float = 30.0) -> Node:
        """A manual failover (CLUSTER FAILOVER on the replica): the replica catches up, then takes
        the master's slots; no write is lost. Returns the new master."""
        replica = self.replica_of(master)
        with replica.client() as c:
            c.execute_command("CLUSTER FAILOVER")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if replica.info("replication").get("role") == "master":
                self.wait_ok(timeout)
                return replica
            time.sleep(0.05)
        raise ServiceError(f"{replica.name} did not take over from {master.name} in {timeout:.0f} s")

    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes if n.proc is not None and n.running]

    def used_memory(self) -> int:
        """Bytes Redis uses on the masters (INFO memory used_memory, summed)."""
        return sum(int(m.info("memory")["used_memory"]) for m in self.masters_now())  # type: ignore[call-overload]

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
