"""Activation batches in the real redis-server, started with broker_config/redis.conf as shipped."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import redis

from schemas import ActivationBatch, WireTensor, decode, encode
from schemas.vectors import FINGERPRINT, example_messages

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def batch(n: int, states: int, width: int, dtype: str, seed: int = 0) -> ActivationBatch:
    rng = np.random.default_rng(seed)
    keys = tuple(f"{seed:08x}{i:056x}" for i in range(n))
    x = rng.normal(size=(n, states, width)).astype(np.float32)
    return ActivationBatch(device_id="dev-a", job_id="job-1", backbone_fingerprint=FINGERPRINT, keys=keys,
                           states=WireTensor.from_array(x, dtype))


def put_rows(r: redis.Redis, b: ActivationBatch, ttl: int | None = 3600) -> list[str]:
    """One hash per sample: the raw WireTensor bytes of its (L+1, d) row and their descriptor."""
    n, s, d = b.states.shape
    itemsize = {"float32": 4, "float16": 2, "int8": 1}[b.states.dtype]
    row = s * d * itemsize
    names = []
    with r.pipeline(transaction=True) as p:
        for i, k in enumerate(b.keys):
            name = f"act:{b.backbone_fingerprint}:{k}"
            fields = {"dtype": b.states.dtype, "shape": json.dumps([s, d]),
                      "data": b.states.data[i * row : (i + 1) * row]}
            if b.states.scale is not None:
                fields["scale"] = b.states.scale[i * 4 * s : (i + 1) * 4 * s]
            p.hset(name, mapping=fields)
            if ttl:
                p.expire(name, ttl)
            names.append(name)
        p.execute()
    return names


def get_row(r: redis.Redis, name: str) -> WireTensor:
    h = r.hgetall(name)
    assert h, f"{name} missing"
    return WireTensor(dtype=h[b"dtype"].decode(), shape=tuple(json.loads(h[b"shape"])), data=h[b"data"],
                      scale=h.get(b"scale"))


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_rows_round_trip_bit_exact(r, dtype):
    b = batch(16, 31, 64, dtype)
    names = put_rows(r, b)
    rows = [get_row(r, n) for n in names]
    assert b"".join(t.data for t in rows) == b.states.data
    if dtype == "int8":
        assert b"".join(t.scale for t in rows) == b.states.scale
    stacked = np.stack([t.to_array() for t in rows])
    np.testing.assert_array_equal(stacked, b.states.to_array())
    scale = b"".join(t.scale for t in rows) if dtype == "int8" else None
    states = WireTensor(dtype=dtype, shape=b.states.shape, data=b"".join(t.data for t in rows), scale=scale)
    rebuilt = b.model_copy(update={"states": states})
    assert rebuilt == b
    assert encode(rebuilt) == encode(b)


def test_whole_payload_round_trip(r):
    for kind, message in example_messages().items():
        t, p = encode(message)
        r.set(f"payload:{kind}", p, ex=600)
        got = r.get(f"payload:{kind}")
        assert got == p
        assert decode(t, got) == message


def test_large_batch_round_trip(r):
    b = batch(64, 31, 2048, "float16", seed=3)  # ~8 MiB
    t, p = encode(b)
    r.set("payload:big", p, ex=600)
    assert decode(t, r.get("payload:big")) == b


def test_config_as_shipped(r):
    cfg = r.config_get("*")
    assert cfg["maxmemory-policy"] == "volatile-lru"
    assert cfg["appendonly"] == "yes"
    assert cfg["appendfsync"] == "everysec"
    assert int(cfg["maxmemory"]) == 2 * 1024**3
    assert cfg["save"] == ""
    assert cfg["bind"].split() == ["127.0.0.1"]
    assert cfg["protected-mode"] == "yes"


def test_aof_is_written(r, redis_server):
    r.set("job:aof-probe", b"1")
    info = r.info("persistence")
    assert info["aof_enabled"] == 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        aof = [p for p in redis_server.state_dir.rglob("*.aof") if p.stat().st_size > 0]
        if aof:
            break
        time.sleep(0.1)
    assert aof, sorted(redis_server.state_dir.rglob("*"))


def test_ttl_is_set_and_honoured(r):
    names = put_rows(r, batch(4, 5, 8, "int8"), ttl=3600)
    for n in names:
        assert 3590 <= r.ttl(n) <= 3600
    short = put_rows(r, batch(4, 5, 8, "float16", seed=9), ttl=None)
    for n in short:
        assert r.ttl(n) == -1  # no TTL yet
        r.pexpire(n, 300)
        assert 0 < r.pttl(n) <= 300
    r.set("plain", b"x", px=300)
    time.sleep(0.6)
    for n in short:
        assert not r.exists(n), f"{n} outlived its TTL"
        assert r.ttl(n) == -2
    assert r.get("plain") is None
    assert all(r.exists(n) for n in names)  # the long-lived ones are untouched


def test_volatile_lru_evicts_only_keys_with_a_ttl(r):
    """Under memory pressure cached activations (TTL) go; job records (no TTL) never do."""
    used = r.info("memory")["used_memory"]
    limit = used + 4 * 1024 * 1024
    try:
        r.config_set("maxmemory", str(limit))
        jobs = []
        for i in range(50):
            r.set(f"job:{i}", json.dumps({"id": i, "state": "training"}).encode())
            jobs.append(f"job:{i}")
        blob = bytes(64 * 1024)
        written = 0
        for i in range(200):  # 12.5 MiB of activations into a 4 MiB budget
            r.set(f"act:{i}", blob, ex=3600)
            written += 1
        assert r.info("stats")["evicted_keys"] > 0
        assert sum(r.exists(f"act:{i}") for i in range(written)) < written
        assert all(r.exists(j) for j in jobs), "a key without TTL was evicted"
        # nothing volatile left to evict once the budget is taken by keys without TTL: writes fail, loudly
        with pytest.raises(redis.exceptions.ResponseError, match="used memory > 'maxmemory'"):
            for i in range(200):
                r.set(f"job:big:{i}", blob)
        assert all(r.exists(j) for j in jobs)
    finally:
        r.config_set("maxmemory", str(2 * 1024**3))
        r.flushall()


def test_job_records_survive_a_restart(redis_server, redis_url):
    with redis.Redis.from_url(redis_url) as r:
        r.set("job:durable", b"state")
        r.set("act:durable", b"cached", ex=3600)
    redis_server.restart()
    with redis.Redis.from_url(redis_server.url) as r:
        deadline = time.monotonic() + 30
        while True:  # replaying the append-only file (the session's earlier tests wrote to it) takes a moment
            try:
                r.ping()
                break
            except redis.exceptions.BusyLoadingError:
                assert time.monotonic() < deadline, "redis still loading its AOF after 30 s"
                time.sleep(0.1)
        assert r.get("job:durable") == b"state"
        assert r.get("act:durable") == b"cached"
        assert 0 < r.ttl("act:durable") <= 3600


def test_a_damaged_cache_entry_is_asked_from_the_board_again(redis_url):
    """A cached row that no longer decodes counts as missing, like an evicted one."""
    from side_server.cache import ActivationCache, act_key

    r = redis.Redis.from_url(redis_url)
    cache = ActivationCache(r, ttl=60)
    keys = tuple(f"{i:064x}" for i in range(3))
    states = WireTensor.from_array(np.ones((3, 5, 16), np.float32), "float16")
    cache.put_batch("dev-x", keys, states)
    got, gone = cache.get_many("dev-x", keys, (2, 4))
    assert gone == [] and got is not None and got.shape == (3, 2, 16)
    r.set(act_key("dev-x", keys[1]), b"\x01\x05\x00\x10\x00" + b"\x00" * 7)  # truncated
    r.set(act_key("dev-x", keys[2]), b"\x09")  # not even a header
    got, gone = cache.get_many("dev-x", keys, (2, 4))
    assert got is None and gone == [keys[1], keys[2]]
