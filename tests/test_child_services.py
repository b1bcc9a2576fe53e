"""The child services (sidetune.services) start as the demo and the benches start them: relative
folders, a port that another process took first, and a failure that says why."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import sidetune.services as services
from sidetune.services import Mosquitto, PortTaken, RedisServer, free_port


@pytest.fixture
def held_port():
    """A loopback port some other process holds (listening) while the test runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def child(service: str, folder: Path, accounts: dict[str, str], **ports: int) -> RedisServer | Mosquitto:
    return (RedisServer(folder, **ports) if service == "redis-server"
            else Mosquitto(folder, dict(accounts), **ports))


def test_a_relative_folder_keeps_redis_log_where_it_belongs(tmp_path, monkeypatch):
    # redis-server changes into its --dir before it opens --logfile: a relative logfile went nowhere
    monkeypatch.chdir(tmp_path)
    r = RedisServer(Path("work") / "redis").start()
    try:
        assert r.state_dir.is_absolute()
        assert "Ready to accept connections" in (tmp_path / "work" / "redis" / "redis.log").read_text()
    finally:
        r.stop()


@pytest.mark.parametrize("service", ["redis-server", "mosquitto"])
def test_a_port_given_and_taken_is_one_clear_error(tmp_path, held_port, service, broker_accounts):
    with pytest.raises(PortTaken, match=f"{service} exited with code 1 at start:(.|\n)*already in use"):
        child(service, tmp_path / "s", broker_accounts, port=held_port).start()


@pytest.mark.parametrize("service", ["redis-server", "mosquitto"])
def test_a_chosen_port_taken_first_is_chosen_again(tmp_path, held_port, monkeypatch, service, broker_accounts):
    # another process binds the port free_port() returned before the child does (the race seen in
    # `bench compare`): the child starts on the next free port
    picks = iter([held_port])
    monkeypatch.setattr(services, "free_port", lambda: next(picks, None) or free_port())
    started = child(service, tmp_path / "s", broker_accounts).start()
    try:
        assert started.port not in (0, held_port)
        with socket.create_connection(("127.0.0.1", started.port), timeout=2):
            pass
    finally:
        started.stop()


def test_a_chosen_tls_port_taken_first_is_chosen_again(tmp_path, held_port, monkeypatch, broker_accounts):
    picks = iter([free_port(), held_port])  # the plain listener's port, then the TLS one: taken
    monkeypatch.setattr(services, "free_port", lambda: next(picks, None) or free_port())
    broker = Mosquitto(tmp_path / "s", dict(broker_accounts), tls=True).start()
    try:
        assert broker.tls_port not in (0, held_port, broker.port)
        with socket.create_connection(("127.0.0.1", broker.tls_port), timeout=2):
            pass
    finally:
        broker.stop()
