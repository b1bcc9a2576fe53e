"""Files an operator copies to a board, and what the agent says when it cannot read them (issue 23).

The tests run as root, whom file modes do not stop; the agent here runs with the two capabilities
that let root read anything (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) dropped by util-linux's
``setpriv``, so the kernel refuses it a file of another user's with mode 0600 as it refuses the
board's ``sidetune`` user a root-owned 0600 file.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SIDETUNE = Path(sys.executable).with_name("sidetune")
NOBODY = 65534
NO_DAC = "-dac_override,-dac_read_search"


def test_export_writes_world_readable_files(tiny_backbone: Path) -> None:
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tiny_backbone.iterdir()}
    assert "backbone.onnx.data" in modes, modes
    assert modes == {name: 0o644 for name in modes}


def _board(tmp_path: Path, backbone: Path) -> Path:
    """A board's files under tmp_path, all readable, and its edge.toml."""
    shutil.copytree(backbone, tmp_path / "backbone")
    shutil.copy(REPO / "deploy" / "task.example.toml", tmp_path / "task.toml")
    (tmp_path / "edge.password").write_text("pw-preflight-1\n")
    (tmp_path / "ca.crt").write_text("not read: preflight stops first\n")
    cfg = tmp_path / "edge.toml"
    cfg.write_text(
        'device_id = "board-pre"\n'
        f'password_file = "{tmp_path / "edge.password"}"\n'
        'broker_host = "127.0.0.1"\nbroker_port = 9\n'
        f'broker_ca_file = "{tmp_path / "ca.crt"}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'backbone_dir = "{tmp_path / "backbone"}"\n'
        f'task_file = "{tmp_path / "task.toml"}"\n'
    )
    return cfg


def _run_without_dac(cfg: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv is missing: apt-get install util-linux")
    cmd = ["setpriv", f"--inh-caps={NO_DAC}", f"--bounding-set={NO_DAC}",
           str(SIDETUNE), "edge", "run", "--config", str(cfg)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("target", "hint"),
    [
        ("backbone/backbone.onnx.data", "chmod o+r"),  # an old export's 0600 data file, copied
        ("backbone/tokenizer.json", "chmod o+r"),
        ("task.toml", "chmod o+r"),
        ("ca.crt", "chmod o+r"),
        ("edge.password", "chown"),  # a secret: given to the agent's user, not to everyone
    ],
)
def test_agent_exits_78_naming_a_file_it_cannot_read(
    tmp_path: Path, tiny_backbone: Path, target: str, hint: str
) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test drops root's capabilities: run it as root (as CI does)")
    cfg = _board(tmp_path, tiny_backbone)
    locked = tmp_path / target
    os.chown(locked, NOBODY, NOBODY)
    locked.chmod(0o600)
    done = _run_without_dac(cfg)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 78, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(locked) in lines[0] and hint in lines[0] and "not readable by user root" in lines[0]


def test_agent_names_a_folder_it_cannot_enter(tmp_path: Path, tiny_backbone: Path) -> None:
    cfg = _board(tmp_path, tiny_backbone)
    folder = tmp_path / "backbone"
    os.chown(folder, NOBODY, NOBODY)
    folder.chmod(0o700)
    done = _run_without_dac(cfg)
    assert done.returncode == 78, done.stderr
    assert f"chmod -R o+rX {folder}" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_readable_board_gets_past_the_preflight(tmp_path: Path, tiny_backbone: Path) -> None:
    """The same files readable: the agent loads its backbone and goes on to the broker, where the
    bogus CA file stops it, so what stopped it above was the preflight and nothing else."""
    cfg = _board(tmp_path, tiny_backbone)
    done = _run_without_dac(cfg)
    assert done.returncode == 78, done.stderr
    assert "cannot use CA file" in done.stderr and "not readable" not in done.stderr, done.stderr
