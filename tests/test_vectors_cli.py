"""``sidetune schema vectors DIR``: one valid payload per kind, reproducible, for clients in other languages."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from schemas import KINDS, decode, encode, topic
from schemas.vectors import DEVICE, example_messages
from sidetune.cli import EXIT_OK, EXIT_USAGE, main

VENV_SIDETUNE = Path(sys.executable).parent / "sidetune"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidetune.cli", *args], capture_output=True, text=True, timeout=60)


def check_dir(out: Path) -> dict[str, dict[str, str]]:
    index = json.loads((out / "index.json").read_text())
    assert set(index) == set(KINDS)
    assert sorted(p.name for p in out.iterdir()) == sorted(["index.json", *(f"{k}.bin" for k in KINDS)])
    for kind in KINDS:
        entry = index[kind]
        assert set(entry) == {"topic", "file", "sha256"}
        assert entry["topic"] == topic(DEVICE, kind)
        assert entry["file"] == f"{kind}.bin"
        payload = (out / entry["file"]).read_bytes()
        assert hashlib.sha256(payload).hexdigest() == entry["sha256"]
        message = decode(entry["topic"], payload)
        assert message.KIND == kind
        assert message == example_messages()[kind]
        assert encode(message) == (entry["topic"], payload)
    return index


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_main_writes_vectors(tmp_path, capsys):
    out = tmp_path / "vectors"
    assert main(["schema", "vectors", str(out)]) == EXIT_OK
    check_dir(out)
    stdout = capsys.readouterr().out
    assert f"wrote {len(KINDS)} vectors and {out}/index.json" in stdout
    for kind in KINDS:
        assert topic(DEVICE, kind) in stdout


def test_subprocess_writes_vectors(tmp_path):
    out = tmp_path / "a" / "b"  # parents are created
    r = run_cli("schema", "vectors", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    check_dir(out)


def test_installed_script(tmp_path):
    assert VENV_SIDETUNE.exists(), f"{VENV_SIDETUNE} missing: pip install -e . in the virtualenv"
    r = subprocess.run([str(VENV_SIDETUNE), "schema", "vectors", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    check_dir(tmp_path)


def test_reproducible(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["schema", "vectors", str(a)]) == 0
    assert run_cli("schema", "vectors", str(b)).returncode == 0
    first = snapshot(a)
    assert first == snapshot(b)
    assert main(["schema", "vectors", str(a)]) == 0  # over an existing folder
    assert snapshot(a) == first


def test_index_matches_the_encoder(tmp_path):
    assert main(["schema", "vectors", str(tmp_path)]) == 0
    index = json.loads((tmp_path / "index.json").read_text())
    for kind, message in example_messages().items():
        t, p = encode(message)
        assert index[kind]["topic"] == t
        assert index[kind]["sha256"] == hashlib.sha256(p).hexdigest()


def _unwritable_targets(tmp_path: Path) -> list[Path]:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    busy = tmp_path / "busy"
    (busy / "jobs.bin").mkdir(parents=True)  # a folder where a vector file must go
    targets = [a_file, a_file / "sub", busy]
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        targets.append(ro / "vectors")
    return targets


def test_unwritable_dir_in_process(tmp_path, capsys):
    for target in _unwritable_targets(tmp_path):
        assert main(["schema", "vectors", str(target)]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.startswith(f"sidetune: error: cannot write vectors to {target}: "), err
        assert "Traceback" not in err


def test_unwritable_dir_subprocess(tmp_path):
    for target in _unwritable_targets(tmp_path):
        r = run_cli("schema", "vectors", str(target))
        assert r.returncode == 2, (target, r.stderr)
        assert "Traceback" not in r.stderr
        assert f"sidetune: error: cannot write vectors to {target}: " in r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
        assert r.stdout == ""


def test_missing_dir_argument_is_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["schema", "vectors"])
    assert e.value.code == 2
    assert "the following arguments are required: dir" in capsys.readouterr().err
    r = run_cli("schema", "vectors")
    assert r.returncode == 2 and "the following arguments are required: dir" in r.stderr
