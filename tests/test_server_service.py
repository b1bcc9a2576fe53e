"""``sidetune server`` as systemd runs it (Type=notify, WatchdogSec): READY, pets, STOPPING,
and exit codes that stop restart loops on configuration errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schemas.errors import ExitCode
from sidetune.services import SERVER_USER
from tests.loop_helpers import wait_for
from tests.test_edge_service import NotifySocket

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def server_config(tmp: Path, mosquitto, redis_url: str, password: str) -> Path:
    pw = tmp / "server.password"
    pw.write_text(password + "\n")
    cfg = tmp / "server.toml"
    cfg.write_text(f"broker_port = {mosquitto.port}\nbroker_password_file = {json.dumps(str(pw))}\n"
                   f"redis_url = {json.dumps(redis_url)}\nworker_id = \"svc-test\"\n")
    return cfg


def server(cfg: Path, **env: str) -> subprocess.Popen[str]:
    import os

    return subprocess.Popen([sys.executable, "-m", "sidetune.cli", "server", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **env})


def test_ready_watchdog_and_stopping(tmp_path, mosquitto, redis_url, broker_accounts):
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = server(server_config(tmp_path, mosquitto, redis_url, broker_accounts[SERVER_USER]),
                  NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000")
    try:
        wait_for(lambda: len(notify.pets()) >= 4, 60, "four watchdog pets")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == ExitCode.OK
    finally:
        if proc.poll() is None:
            proc.kill()
        time.sleep(0.1)
        notify.close()
    states = [m for _, m in notify.messages]
    assert states[0] == "READY=1" and states[-1] == "STOPPING=1", states
    pets = notify.pets()
    assert max(b - a for a, b in zip(pets, pets[1:])) < 1.0  # WatchdogSec/4 = 0.5 s, well under 1 s


@pytest.mark.parametrize("what", ["broker password", "redis password"])
def test_refused_credentials_exit_78_with_one_line(tmp_path, mosquitto, redis_url, broker_accounts, what):
    password, url = broker_accounts[SERVER_USER], redis_url
    if what == "broker password":
        password = "wrong-" + password
    else:
        url = "redis://" + redis_url.split("@", 1)[1] if "@" in redis_url else redis_url
        assert url != redis_url, "the test Redis must require a password"
    proc = server(server_config(tmp_path, mosquitto, url, password))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.CONFIG, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sidetune: error: ") and "Traceback" not in err, err
