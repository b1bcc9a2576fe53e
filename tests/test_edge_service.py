"""The board's agent as systemd runs it: exit codes, a broker that is down at start,
the watchdog during long phases, status and train, private files, settings overrides.

Everything runs against a real mosquitto (and Redis and a worker where a round
must finish); the agent runs as ``sidetune edge run`` in a subprocess where its
exit code and its stderr are the point.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeSettings
from schemas import encode
from schemas.errors import ExitCode
from schemas.settings import ConfigError, load_settings
from sidetune.cli import main
from sidetune.services import SERVER_USER, Mosquitto, free_port
from tests.loop_helpers import (
    TASK_TOML,
    AgentThread,
    edge_settings,
    make_samples,
    request_round,
    round_state,
    server_settings,
    start_worker,
    wait_for,
    write_jsonl,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def write_config(path: Path, **values: object) -> Path:
    lines = []
    for k, v in values.items():
        lines.append(f"{k} = {json.dumps(str(v)) if isinstance(v, Path) else json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def board_config(tmp: Path, backbone: Path, port: int, device: str, password: str, **kw: object) -> Path:
    task = tmp / "task.toml"
    task.write_text(TASK_TOML)
    pw = tmp / "edge.password"
    pw.write_text(password + "\n")
    values: dict[str, object] = dict(device_id=device, password_file=pw, broker_port=port, state_dir=tmp / "state",
                                     backbone_dir=backbone, task_file=task, max_length=32, out_dim=4)
    values.update(kw)
    return write_config(tmp / "edge.toml", **values)


def edge_run(config: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidetune.cli", "edge", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def assert_config_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == ExitCode.CONFIG, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sidetune: error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for w in words:
        assert w in lines[0], (w, lines[0])


# ----------------------------------------------------------------- exit 78, one line


@pytest.mark.edge
def test_missing_backbone_folder_is_a_configuration_error(tmp_path):
    cfg = board_config(tmp_path, tmp_path / "no-such-backbone", free_port(), "dev-x", "pw-x")
    assert_config_error(edge_run(cfg), "no-such-backbone", "does not exist")


@pytest.mark.edge
def test_bad_task_is_a_configuration_error(tmp_path, tiny_backbone):
    cfg = board_config(tmp_path, tiny_backbone, free_port(), "dev-x", "pw-x")
    (tmp_path / "task.toml").write_text('name = "t"\ntemplate = "no placeholder"\n')
    assert_config_error(edge_run(cfg), "task")


@pytest.mark.edge
def test_example_password_is_refused(tmp_path, tiny_backbone):
    cfg = board_config(tmp_path, tiny_backbone, free_port(), "dev-x", "change-me")
    assert_config_error(edge_run(cfg), "example")


@pytest.mark.edge
def test_wrong_password_is_a_configuration_error(tmp_path, tiny_backbone, mosquitto, device_account):
    device, _ = device_account
    cfg = board_config(tmp_path, tiny_backbone, mosquitto.port, device, "not-the-password")
    assert_config_error(edge_run(cfg), "refused", device)


@pytest.mark.edge
def test_certificate_from_another_ca_is_a_configuration_error(tmp_path, tiny_backbone, mosquitto, device_account):
    from sidetune.certs import make_ca

    device, password = device_account
    other_ca = make_ca(tmp_path / "other-ca", name="not the broker's CA", days=2)
    cfg = board_config(tmp_path, tiny_backbone, mosquitto.tls_port, device, password,
                       broker_host="localhost", broker_ca_file=other_ca)
    assert_config_error(edge_run(cfg), "does not verify")


@pytest.mark.edge
def test_the_right_ca_connects(tmp_path, tiny_backbone, mosquitto, device_account):
    device, password = device_account
    cfg = board_config(tmp_path, tiny_backbone, mosquitto.tls_port, device, password,
                       broker_host="localhost", broker_ca_file=mosquitto.ca_file)
    proc = subprocess.Popen([sys.executable, "-m", "sidetune.cli", "edge", "run", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        state = tmp_path / "state"
        wait_for(lambda: json.loads((state / "agent.json").read_text()).get("connected")
                 if (state / "agent.json").exists() else False, 30, "the agent to connect over TLS")
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert err == "", err  # logs go to stdout; stderr is for the one error line


# ----------------------------------------------------------------- broker down at start


def test_broker_down_at_start_the_round_completes_once_it_is_up(tmp_path, tiny_backbone, redis_url,
                                                                 broker_accounts, device_account):
    device, password = device_account
    broker = Mosquitto(tmp_path / "late-broker", {SERVER_USER: broker_accounts[SERVER_USER], device: password},
                       port=free_port())
    settings = edge_settings(tmp_path, tiny_backbone, broker, device, password, hyper={"epochs": 5})
    worker = None
    try:
        with AgentThread(EdgeAgent(settings)) as agent:
            request_round(agent, make_samples(40, seed=3))
            wait_for(lambda: agent.ledger.outbox_size() >= 1, 30, "the job queued in the outbox")
            time.sleep(1.5)
            assert agent.round is not None and agent.ledger.outbox_size() >= 1  # still waiting, still alive
            assert not agent.transport.connected.is_set()
            broker.start()
            worker = start_worker(server_settings(broker, redis_url, broker_accounts[SERVER_USER]))
            done = wait_for(lambda: round_state(agent, 1), 120, "round 1 after the broker came up")
            assert done["state"] == "done", done
            assert agent.ledger.outbox_size() == 0
    finally:
        if worker is not None:
            worker.stop()
        broker.stop()


# ----------------------------------------------------------------- watchdog


class NotifySocket:
    """A datagram socket standing where systemd's would: every message with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()

    def pets(self) -> list[float]:
        return [t for t, m in self.messages if m == "WATCHDOG=1"]


class SlowSession:
    """The backbone's ONNX session, slowed to a small board's pace (the graph still runs)."""

    def __init__(self, session: object, seconds: float) -> None:
        self.session, self.seconds = session, seconds
        self.calls = 0

    def run(self, *args: object, **kw: object) -> object:
        time.sleep(self.seconds)
        self.calls += 1
        return self.session.run(*args, **kw)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.session, name)


def test_watchdog_gaps_stay_under_half_its_timeout_on_a_slow_board(tmp_path, tiny_backbone, mosquitto, redis_url,
                                                                     broker_accounts, device_account, monkeypatch):
    """WatchdogSec=2 s; each backbone batch of 8 takes 0.3 s: a 64-sample chunk takes 2.4 s,
    so petting once per chunk (or per main-loop turn) would leave gaps past the timeout."""
    device, password = device_account
    notify = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    holdout = write_jsonl(tmp_path / "holdout.jsonl", make_samples(48, seed=98))
    settings = edge_settings(tmp_path, tiny_backbone, mosquitto, device, password, holdout_file=holdout,
                             batch_size=8, hyper={"epochs": 3})
    worker = start_worker(server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER]))
    try:
        agent = EdgeAgent(settings)
        slow = SlowSession(agent.backbone.session, 0.3)
        agent.backbone.session = slow  # type: ignore[assignment]
        with AgentThread(agent):
            request_round(agent, make_samples(96, seed=4))
            done = wait_for(lambda: round_state(agent, 1), 120, "round 1")
            assert done["state"] == "done", done
            assert done["tuned_accuracy"] is not None  # the held-out evaluation ran (slowly) too
    finally:
        worker.stop()
        notify.close()
    assert slow.calls >= (96 + 48) // 8
    states = [m for _, m in notify.messages]
    assert "READY=1" in states and states[-1] == "STOPPING=1"
    pets = notify.pets()
    gaps = [b - a for a, b in zip(pets, pets[1:])]
    assert len(pets) > 10 and max(gaps) < 1.0, f"longest gap {max(gaps):.2f} s between {len(pets)} pets"


# ----------------------------------------------------------------- status, train


@pytest.mark.edge
def test_train_without_an_agent_fails_clearly(tmp_path, tiny_backbone, capsys):
    cfg = board_config(tmp_path, tiny_backbone, free_port(), "dev-x", "pw-x")
    assert main(["edge", "train", "--config", str(cfg)]) == ExitCode.UNAVAILABLE
    err = capsys.readouterr().err
    assert "no agent runs on" in err and "systemctl start sidetune-edge" in err
    assert not (tmp_path / "state" / "train.request").exists()


def test_status_says_running_connected_adapter_and_last_round(tmp_path, tiny_backbone, mosquitto, redis_url,
                                                              broker_accounts, device_account, capsys):
    device, password = device_account
    cfg = board_config(tmp_path, tiny_backbone, mosquitto.port, device, password, upload_batch=32,
                       taps=[1, 2, 3, 4])
    settings = load_settings(EdgeSettings, cfg, hyper={"epochs": 3})
    worker = start_worker(server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER]))
    try:
        with AgentThread(EdgeAgent(settings)) as agent:
            wait_for(lambda: agent.transport.connected.is_set(), 30, "the agent to connect")
            request_round(agent, make_samples(30, seed=5))
            wait_for(lambda: round_state(agent, 1), 120, "round 1")
            time.sleep(0.5)  # the presence file is rewritten on the next turn of the loop
            assert main(["edge", "status", "--config", str(cfg), "--json"]) == 0
            st = json.loads(capsys.readouterr().out)
            assert st["running"] and st["connected"] and st["pid"] == os.getpid()
            assert st["adapter_version"] == 1 and st["last_round"]["state"] == "done"
            assert st["last_round"]["new_samples"] == 30 and st["outbox"] == 0 and st["new_samples"] == 0
            assert main(["edge", "train", "--config", str(cfg)]) == 0
            assert "round requested" in capsys.readouterr().out
            assert main(["edge", "status", "--config", str(cfg)]) == 0
            text = capsys.readouterr().out
            assert f"agent {device}: running (pid {os.getpid()}), connected to" in text
            assert "adapter:  v1" in text and "last round: #1 done" in text
    finally:
        worker.stop()
    assert main(["edge", "status", "--config", str(cfg), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert not st["running"] and not st["connected"] and st["activity"] == "stopped"
    assert st["adapter_version"] == 1


@pytest.mark.edge
def test_a_second_agent_on_the_same_state_is_refused(tmp_path, tiny_backbone, mosquitto, device_account):
    device, password = device_account
    settings = edge_settings(tmp_path, tiny_backbone, mosquitto, device, password)
    with AgentThread(EdgeAgent(settings)) as agent:
        wait_for(lambda: (agent.state_dir / "agent.json").exists(), 30, "the first agent")
        (tmp_path / "second").mkdir()
        cfg = board_config(tmp_path / "second", tiny_backbone, mosquitto.port, device, password,
                           state_dir=agent.state_dir, taps=[1, 2, 3, 4])
        assert_config_error(edge_run(cfg), "another agent already runs")


# ----------------------------------------------------------------- files and settings


def test_files_holding_samples_or_secrets_are_private_whatever_the_umask(tmp_path, tiny_backbone, mosquitto,
                                                                         redis_url, broker_accounts, device_account):
    device, password = device_account
    holdout = write_jsonl(tmp_path / "holdout.jsonl", make_samples(20, seed=97))
    settings = edge_settings(tmp_path, tiny_backbone, mosquitto, device, password, holdout_file=holdout,
                             hyper={"epochs": 2})
    old = os.umask(0o022)
    worker = start_worker(server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER]))
    try:
        with AgentThread(EdgeAgent(settings)) as agent:
            request_round(agent, make_samples(20, seed=6))
            assert wait_for(lambda: round_state(agent, 1), 120, "round 1")["state"] == "done"
    finally:
        worker.stop()
        os.umask(old)
    state = Path(settings.state_dir)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    private = [state / "state.db", state / "secret.json", state / "agent.json",
               *state.glob("adapter/*"), *state.glob("holdout-*.npz"), *state.glob("state.db-*")]
    assert len(private) >= 6
    for p in private:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


@pytest.mark.edge
def test_nested_environment_overrides_reach_hyper_parameters(tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "edge.toml", device_id="b-1", state_dir=tmp_path, backbone_dir=tmp_path,
                       task_file=tmp_path / "t.toml")
    cfg.write_text(cfg.read_text() + "[hyper]\nlr = 0.002\n")
    monkeypatch.setenv("SIDETUNE_EDGE_HYPER__EPOCHS", "7")
    s = load_settings(EdgeSettings, cfg)
    assert s.hyper.epochs == 7 and s.hyper.lr == 0.002  # the file's other keys stay
    monkeypatch.setenv("SIDETUNE_EDGE_HYPER__EPOCHS", "0")
    with pytest.raises(ConfigError, match="hyper.epochs"):
        load_settings(EdgeSettings, cfg)


@pytest.mark.edge
def test_password_from_a_systemd_credential(tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "edge.toml", device_id="b-1", state_dir=tmp_path, backbone_dir=tmp_path,
                       task_file=tmp_path / "t.toml")
    s = load_settings(EdgeSettings, cfg)
    with pytest.raises(ConfigError, match="no password"):
        s.broker_password()
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "broker-password").write_text("from-systemd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    assert s.broker_password() == "from-systemd"


@pytest.mark.edge
def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("sidetune ")


@pytest.mark.edge
def test_a_missing_extra_names_the_extra_to_install(tmp_path):
    """A board (edge extra only) asked to run the server: which extra, not a traceback."""
    code = ("import sys; sys.modules['redis'] = None; from sidetune.cli import main; "
            f"sys.exit(main(['server', '--config', {str(tmp_path / 'none.toml')!r}]))")
    (tmp_path / "none.toml").write_text('broker_password = "x"\n')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == ExitCode.CONFIG, proc.stderr
    assert proc.stderr.strip() == ("sidetune: error: `sidetune server` needs the 'server' extra (redis is not "
                                   "installed): pip install 'sidetune[server]'")


@pytest.mark.edge
def test_log_lines_carry_journald_levels_under_systemd(tmp_path):
    code = ("import logging; from schemas.logs import setup_logging; setup_logging('INFO'); "
            "logging.getLogger('sidetune.edge').warning('outbox %d', 3); logging.getLogger('x').info('up')")
    env = {**os.environ, "JOURNAL_STREAM": "8:1234"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=30)
    assert proc.stdout.splitlines() == ["<4>sidetune.edge WARNING outbox 3", "<6>x INFO up"]
    assert proc.stderr == ""


@pytest.mark.edge
def test_predict_builds_the_model_only(tmp_path, tiny_backbone, capsys):
    """No broker, no ledger, no daemon: the backbone, the secret and the installed adapter (none yet)."""
    cfg = board_config(tmp_path, tiny_backbone, free_port(), "dev-x", "pw-x")
    assert main(["edge", "predict", "--config", str(cfg), "great fun movie", "dull boring plot"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, text in zip(lines, ["great fun movie", "dull boring plot"]):
        cls, probs, version, echoed = line.split("\t")
        assert cls in ("fresh", "rotten") and probs.startswith("[fresh ") and version == "adapter v0"
        assert echoed == text
    state = tmp_path / "state"
    assert (state / "secret.json").exists() and not (state / "state.db").exists()


@pytest.mark.edge
def test_log_arguments_cannot_forge_lines_or_flood(tmp_path):
    forged = "board-1\n2026-01-01 00:00:00 sidetune.server ERROR worker crashed\x1b[31m"
    code = ("import logging, sys; from schemas.logs import setup_logging; setup_logging('INFO'); "
            f"log = logging.getLogger('t'); log.warning('rejected %s from %s (%d)', {forged!r}, 'x' * 5000, 7)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    assert "board-1\\n2026-01-01" in lines[0] and "\\x1b[31m" in lines[0] and "\x1b" not in lines[0]
    assert lines[0].endswith("…(+4700 chars) (7)") and len(lines[0]) < 800


def test_a_job_over_a_busy_quota_waits_and_goes_again(tmp_path, tiny_backbone, mosquitto, redis_url,
                                                      broker_accounts, mqtt_client, device_account):
    """quota_jobs says "not now": the round stays open and its job goes again after round_timeout,
    and finishes once the device's other job is done."""
    from side_server.config import Quotas
    from tests.loop_helpers import make_batch, make_job

    device, password = device_account
    settings = edge_settings(tmp_path, tiny_backbone, mosquitto, device, password, round_timeout=3.0,
                             hyper={"epochs": 2})
    worker = start_worker(server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER],
                                          quotas=Quotas(jobs_in_flight=1)))
    raw = mqtt_client(device, password)
    try:
        blocker = make_job(device)  # waits for its activations: the device's one job in flight
        raw.publish(*encode(blocker), qos=1).wait_for_publish(5)
        time.sleep(1.0)
        with AgentThread(EdgeAgent(settings)) as agent:
            request_round(agent, make_samples(20, seed=8))
            wait_for(lambda: agent.round is not None, 30, "the round to start")
            time.sleep(4.0)  # rejected (quota_jobs), then sent again at least once
            assert round_state(agent, 1) is None and agent.round is not None  # not failed: waiting
            raw.publish(*encode(make_batch(blocker)), qos=1).wait_for_publish(5)
            done = wait_for(lambda: round_state(agent, 1), 90, "round 1 once the slot is free")
            assert done["state"] == "done", done
    finally:
        worker.stop()
