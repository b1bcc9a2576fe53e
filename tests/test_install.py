"""The install scripts under --root, the Deploy section followed word for word, the example configs.

deploy/install-server.sh and deploy/install-board.sh run with ``--root`` (no apt, no systemctl,
no users) and ``--venv .venv`` (the repository's environment: seconds, not a pip install); a
real mosquitto is then started from what they installed (standalone, and the installed conf.d
fragment under a copy of Debian's stock mosquitto.conf) and the installed board configuration
connects over TLS.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_provision import OK, free_ports, login, mosquitto_bin, start, stock_config  # noqa: F401

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)
#: The file whose "## Deploy" section (or, without one, whole text) the doc test follows.
#: docs/deploy-section.md until the lead pastes it into README.md; then point this there.
DEPLOY_DOC = REPO / "README.md"


def run_script(name: str, *args: str, env: dict[str, str] | None = None, check: bool = True
               ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", str(REPO / "deploy" / name), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


@pytest.fixture
def root() -> Iterator[Path]:
    """A --root folder others can traverse (a root-started mosquitto reads its files as its user)."""
    d = Path(tempfile.mkdtemp(prefix="sidetune-root-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def installed_board(board_root: Path, port: int | None = None):  # noqa: ANN201
    """The installed /etc/sidetune/edge.toml, only its host/port/CA/password paths moved under --root."""
    from edge_agent.config import EdgeSettings
    from schemas.settings import load_settings

    etc = board_root / "etc" / "sidetune"
    over: dict[str, object] = {"broker_ca_file": str(etc / "ca.crt"), "password_file": etc / "edge.password"}
    if port is not None:
        over["broker_port"] = port
    return load_settings(EdgeSettings, etc / "edge.toml", **over)


# ------------------------------------------------------------------ the scripts under --root


def test_install_server_then_board_and_connect_over_tls(root, start):  # noqa: F811
    srv_root, board_root = root / "server", root / "board"
    tls, plain, redis_port = free_ports(3)
    broker_user = "mosquitto" if os.geteuid() == 0 else getpass.getuser()
    run_script("install-server.sh", "--root", str(srv_root), "--venv", str(VENV), "--hostname", "localhost",
               "--tls-port", str(tls), "--plain-port", str(plain), "--redis-port", str(redis_port),
               "--bind", "127.0.0.1", "--broker-user", broker_user, ".")
    broker = srv_root / "etc/sidetune/broker"
    for path in ("etc/mosquitto/conf.d/sidetune.conf", "etc/redis/sidetune.conf", "etc/sidetune/server.toml",
                 "etc/systemd/system/sidetune-server@.service", "opt/sidetune/.venv/bin/sidetune",
                 "opt/sidetune/broker_config/sidetune.conf"):
        assert (srv_root / path).exists(), path
    assert (srv_root / "etc/mosquitto/conf.d/sidetune.conf").read_bytes() == (broker / "conf.d/sidetune.conf").read_bytes()
    assert stat.S_IMODE((srv_root / "etc/redis/sidetune.conf").stat().st_mode) == 0o640

    # a board, provisioned with the installed command, installed from its bundle
    sidetune = srv_root / "opt/sidetune/.venv/bin/sidetune"
    subprocess.run([str(sidetune), "broker", "add-device", "board-5", "--dir", str(broker)], check=True,
                   capture_output=True)
    run_script("install-board.sh", "--root", str(board_root), "--venv", str(VENV),
               "--bundle", str(broker / "devices/board-5"), ".")
    etc = board_root / "etc/sidetune"
    assert stat.S_IMODE((etc / "edge.password").stat().st_mode) == 0o600
    assert (etc / "task.toml").read_text() == (REPO / "deploy/task.example.toml").read_text()
    assert (board_root / "etc/systemd/system/sidetune-edge.service").exists()
    assert stat.S_IMODE((board_root / "var/lib/sidetune").stat().st_mode) == 0o700
    board = installed_board(board_root)
    assert (board.device_id, board.broker_host, board.broker_port) == ("board-5", "localhost", tls)

    # an upgrade of both keeps the broker's certificates and passwords
    before = {n: (broker / n).read_bytes() for n in ("ca.crt", "passwd", "server.password")}
    out = run_script("install-server.sh", "--root", str(srv_root), "--venv", str(VENV), ".").stdout
    assert "wrote" in out and before == {n: (broker / n).read_bytes() for n in before}
    # ... and gives an installed server.toml from before the secret share group the broker's one
    from schemas.settings import load_settings
    from side_server.config import ServerSettings

    installed = srv_root / "etc/sidetune/server.toml"
    group = load_settings(ServerSettings, broker / "server.toml").share_group
    assert load_settings(ServerSettings, installed).share_group == group
    installed.write_text("".join(line for line in installed.read_text().splitlines(keepends=True)
                                 if not line.startswith("share_group")))
    out = run_script("install-server.sh", "--root", str(srv_root), "--venv", str(VENV), ".").stdout
    assert "added the secret share_group" in out and load_settings(ServerSettings, installed).share_group == group
    run_script("install-board.sh", "--root", str(board_root), "--venv", str(VENV), ".")

    # standalone: mosquitto -c /etc/sidetune/broker/mosquitto.conf
    proc = start([mosquitto_bin(), "-c", str(broker / "mosquitto.conf")], tls, broker / "state/mosquitto.log",
                 "installed standalone mosquitto")
    assert login(board.broker_port, board.device_id, board.broker_password(), ca_file=board.broker_ca_file,
                 host=board.broker_host, publish="sidetune/v1/board-5/status") == OK
    proc.terminate()
    proc.wait(10)

    # the installed fragment (/etc/mosquitto/conf.d) under Debian's stock mosquitto.conf
    conf = stock_config(root / "stock", None, "mosquitto" if os.geteuid() == 0 else None,
                        include_dir=srv_root / "etc/mosquitto/conf.d")
    start([mosquitto_bin(), "-c", str(conf)], tls, root / "stock/log/mosquitto.log", "stock mosquitto")
    assert login(board.broker_port, board.device_id, board.broker_password(), ca_file=board.broker_ca_file,
                 host=board.broker_host, publish="sidetune/v1/board-5/jobs") == OK
    assert login(board.broker_port, board.device_id, "wrong", ca_file=board.broker_ca_file).startswith("refused")


def test_the_scripts_check_os_architecture_python_and_bundle(tmp_path):
    fedora = tmp_path / "os-release"
    fedora.write_text('ID=fedora\nID_LIKE="rhel centos"\n')
    common = ["--root", str(tmp_path / "r"), "--venv", str(VENV)]
    for script, extra in (("install-server.sh", []), ("install-board.sh", ["--bundle", str(tmp_path)])):
        p = run_script(script, *common, *extra, ".", env={"SIDETUNE_OS_RELEASE": str(fedora)}, check=False)
        assert p.returncode == 1 and "unsupported OS 'fedora rhel centos'" in p.stderr, p.stderr
    (tmp_path / "edge.toml").touch()
    (tmp_path / "ca.crt").touch()
    (tmp_path / "edge.password").touch()
    p = run_script("install-server.sh", *common, ".", env={"SIDETUNE_ARCH": "armv7l"}, check=False)
    assert p.returncode == 1 and "unsupported architecture armv7l" in p.stderr
    p = run_script("install-board.sh", *common, "--bundle", str(tmp_path), ".", env={"SIDETUNE_ARCH": "riscv64"},
                   check=False)
    assert p.returncode == 1 and "unsupported architecture riscv64" in p.stderr
    old = tmp_path / "old-venv"
    (old / "bin").mkdir(parents=True)
    for name, body in (("python", "#!/bin/sh\n[ \"$1\" = -V ] && { echo 'Python 3.9.2'; exit 0; }\nexit 1\n"),
                       ("sidetune", "#!/bin/sh\n")):
        (old / "bin" / name).write_text(body)
        (old / "bin" / name).chmod(0o755)
    p = run_script("install-board.sh", "--root", str(tmp_path / "r"), "--venv", str(old), "--bundle", str(tmp_path),
                   ".", check=False)
    assert p.returncode == 1 and "is Python 3.9.2: sidetune needs Python 3.10 or newer" in p.stderr, p.stderr
    p = run_script("install-board.sh", *common, ".", check=False)
    assert p.returncode == 1 and "--bundle is required" in p.stderr
    p = run_script("install-board.sh", *common, "--bundle", str(tmp_path / "r"), ".", check=False)
    assert p.returncode == 1 and "edge.toml is missing" in p.stderr


def test_install_server_tells_no_step_it_has_done(root):
    """Issue 23: `broker init`'s "next steps" (copy the fragment, Redis's include, restart) and
    `broker refresh`'s "restart ... to apply" are the script's own work; it does not print them."""
    args = ["--root", str(root), "--venv", str(VENV), "--hostname", "broker.example.lan", "."]
    first = run_script("install-server.sh", *args).stdout
    assert "broker: TLS on" in first and "next steps" not in first and "include /etc/redis" not in first, first
    upgrade = run_script("install-server.sh", "--root", str(root), "--venv", str(VENV), ".").stdout
    assert "to apply" not in upgrade and "certificates and passwords unchanged" in upgrade, upgrade
    assert (root / "etc/redis/sidetune.conf").exists()


def test_install_board_backbone_flag(root, tiny_backbone):
    """--backbone installs an export whose data file is 0600 (as older exports wrote it) readable
    by all; a folder that is not an export is refused."""
    bundle = root / "bundle"
    bundle.mkdir()
    for name in ("edge.toml", "ca.crt", "edge.password"):
        (bundle / name).write_text("x\n")
    common = ["--root", str(root / "r"), "--venv", str(VENV), "--bundle", str(bundle)]
    p = run_script("install-board.sh", *common, "--backbone", str(bundle), ".", check=False)
    assert p.returncode == 1 and "has no manifest.json" in p.stderr, p.stderr
    exported = root / "exported"
    shutil.copytree(tiny_backbone, exported)
    (exported / "backbone.onnx.data").chmod(0o600)
    run_script("install-board.sh", *common, "--backbone", str(exported), ".")
    installed = root / "r/opt/sidetune/backbone"
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in installed.iterdir()} == {
        p.name: 0o644 for p in exported.iterdir()}
    # a backbone already there (copied by hand) gets the same modes from a later run
    (installed / "tokenizer.json").chmod(0o600)
    p = run_script("install-board.sh", *common, ".")
    assert stat.S_IMODE((installed / "tokenizer.json").stat().st_mode) == 0o644
    assert "no backbone" not in p.stderr


# ------------------------------------------------------------------ the Deploy section, word for word


def deploy_blocks(path: Path = DEPLOY_DOC) -> list[tuple[str, str]]:
    """(host, text) of the ```bash blocks of the "## Deploy" section of ``path`` (the whole file if it
    has none); a block's host is the word after its ``bash`` tag (``server``, ``board``, ``export``).
    scripts/test-deploy reads them the same way."""
    text = path.read_text()
    m = re.search(r"^## Deploy\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    section = m.group(1) if m else text
    return re.findall(r"^```bash(?: (\w+))?\n(.*?)^```", section, flags=re.M | re.S)


def deploy_commands(path: Path = DEPLOY_DOC) -> list[str]:
    return [block for _host, block in deploy_blocks(path)]


def under_root(block: str, root: Path, backbone: Path | None = None) -> tuple[str, set[str]]:
    """A block of the Deploy section as it runs under --root: the install scripts get ``--root``
    and ``--venv``, absolute paths move under the root, `scp -r X host:Y` copies locally, the
    systemctl steps are left out and `sidetune export --out DIR` copies ``backbone`` (an exported
    tiny model) to DIR. Returns the script and the rules that applied."""
    used: set[str] = set()
    out = []
    for line in block.splitlines():
        line, n = re.subn(r"^\S*sidetune export --model \S+ --out (\S+)$", rf"cp -r {backbone} \1", line)
        used |= {"export"} if n else set()
        if re.match(r"\s*systemctl\b", line):
            used.add("systemctl")
            continue
        line, n = re.subn(r"(deploy/install-(?:server|board)\.sh)\b", rf"\1 --root {root} --venv {VENV}", line)
        used |= {"install"} if n else set()
        line, n = re.subn(r"^scp -r (\S+) [\w.@-]+:(\S+)$", r"cp -r \1 \2", line)
        used |= {"scp"} if n else set()
        line, n = re.subn(r"(?<![\w./-])/(etc|opt|var|root)/", rf"{root}/\1/", line)
        used |= {"paths"} if n else set()
        out.append(line)
    return "set -euo pipefail\n" + "\n".join(out) + "\n", used


def test_the_deploy_section_runs_word_for_word_under_root(root, tiny_backbone):
    blocks = deploy_blocks()
    assert len(blocks) >= 6, f"{DEPLOY_DOC} lost its ```bash blocks"
    assert {host for host, _ in blocks} == {"server", "board", "export"}, [host for host, _ in blocks]
    (root / "root").mkdir()
    (root / "export").mkdir()
    # a copy as older exports wrote it (data file 0600): the board's install makes it readable
    exported = root / "exported"
    shutil.copytree(tiny_backbone, exported)
    (exported / "backbone.onnx.data").chmod(0o600)
    used: set[str] = set()
    passwords = []
    for host, block in blocks:
        script, rules = under_root(block, root, exported)
        used |= rules
        cwd = root / "export" if host == "export" else REPO  # the export's output stays out of the source folder
        proc = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{block}\n---\n{script}\n---\n{proc.stderr}{proc.stdout}"
        pw = root / "etc/sidetune/edge.password"
        if pw.exists() and (not passwords or passwords[-1] != pw.read_text()):
            passwords.append(pw.read_text())
    assert used == {"systemctl", "install", "scp", "paths", "export"}
    installed = root / "opt/sidetune/backbone"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in installed.iterdir()}
    assert modes == {name: 0o644 for name in modes} and "backbone.onnx.data" in modes, modes
    assert stat.S_IMODE(installed.stat().st_mode) == 0o755
    broker = root / "etc/sidetune/broker"
    assert "board-17" in (broker / "passwd").read_text()
    # the board holds the rotated password, which is the broker's current one
    assert len(passwords) == 2 and passwords[-1] == (broker / "devices/board-17/edge.password").read_text()
    board = installed_board(root)
    assert (board.device_id, board.broker_host, board.broker_port) == ("board-17", "broker.example.lan", 8883)
    assert board.broker_password() == passwords[-1].strip()
    assert (root / "etc/mosquitto/conf.d/sidetune.conf").exists()


# ------------------------------------------------------------------ example configurations


def _example_checks(cls: type, example: Path, deployment: set[str]) -> None:
    from pydantic import BaseModel

    from schemas.toml import loads

    text = example.read_text()
    data = loads(text)
    commented = set(re.findall(r"^#\s*([a-z_]+)\s*=", text, flags=re.M))
    assert not {"password", "broker_password"} & set(data), "inline passwords in an example"
    for name, f in cls.model_fields.items():
        assert name in data or name in commented, f"{example.name} does not document {name}"
        default = f.get_default(call_default_factory=True) if name != "worker_id" else None
        if name in commented:
            assert name not in data and (default in (None, "") or name == "worker_id"), name
            continue
        if name in deployment:
            continue
        if isinstance(default, BaseModel):
            assert data[name] == default.model_dump(), f"{example.name} [{name}] differs from the code's defaults"
        else:
            assert data[name] == default, f"{example.name}: {name} = {data[name]!r}, the code says {default!r}"
    assert not set(data) - set(cls.model_fields), f"{example.name}: unknown keys"
    # every key carries a comment (on its line or the lines just above)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^#?\s*[a-z_]+\s*=", line) and not line.startswith("# ") or re.match(r"^# [a-z_]+ =", line):
            assert "#" in line.split("=", 1)[1] or lines[i - 1].startswith("#"), f"no comment for: {line}"


def test_example_configs_document_every_key_with_the_code_defaults():
    from edge_agent.config import EdgeSettings
    from schemas.settings import load_settings
    from side_server.config import ServerSettings

    _example_checks(EdgeSettings, REPO / "deploy/edge.example.toml",
                    # per deployment: written by `sidetune broker add-device` (no default, or a local broker's)
                    {"device_id", "password_file", "broker_host", "broker_port", "broker_ca_file", "state_dir",
                     "backbone_dir", "task_file"})
    _example_checks(ServerSettings, REPO / "deploy/server.example.toml",
                    {"broker_password_file", "redis_password_file"})  # written by `sidetune broker init`
    assert load_settings(EdgeSettings, REPO / "deploy/edge.example.toml").max_length == 128
    assert load_settings(ServerSettings, REPO / "deploy/server.example.toml").share_group == "workers"


def test_a_cohort_members_bundle_brings_the_cohort_secret(tmp_path):
    """add-device --cohort writes the membership into the bundle; the board's install refuses it
    without the cohort's secret beside it, and installs the secret 0600 when it is there."""
    from sidetune.provision import BrokerParams, add_device, init_broker

    broker = tmp_path / "broker"
    init_broker(broker, BrokerParams(hostnames=["localhost"]))
    bundle = add_device(broker, "board-9", cohort="press-line")
    args = ["--root", str(tmp_path / "board"), "--venv", str(VENV), "--bundle", str(bundle), "."]
    p = run_script("install-board.sh", *args, check=False)
    assert p.returncode != 0 and "cohort.json is missing" in p.stderr, p.stderr
    subprocess.run([str(VENV / "bin" / "sidetune"), "cohort", "secret", "press-line", "--out",
                    str(bundle / "cohort.json")], check=True, capture_output=True)
    run_script("install-board.sh", *args)
    etc = tmp_path / "board" / "etc/sidetune"
    assert stat.S_IMODE((etc / "cohort.json").stat().st_mode) == 0o600
    assert 'cohort = "press-line"' in (etc / "edge.toml").read_text()
