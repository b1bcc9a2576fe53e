"""`sidetune try`: three files (task, train, held-out) to a tuned board on the tiny backbone, with
real mosquitto, redis-server, worker and agent processes; the board folder it leaves keeps working
(`edge predict` agrees with the agent's held-out figure, `edge run` runs a second round)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent.config import EdgeSettings
from edge_agent.ledger import Ledger
from schemas.settings import load_settings
from sidetune.cli import main
from tests.loop_helpers import TASK_TOML, make_samples, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
BAD_TASK = (
    'name = "x"\ntemplate = "{text}"\nclasses = ["fresh", "rotten"]\n'
    'verbalizers = [" positive", " splendiferous"]\n'
)


def sidetune(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidetune.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )  # type: ignore[call-overload]


def files(tmp: Path, train: int = 60, holdout: int = 30) -> tuple[Path, Path, Path]:
    task = tmp / "task.toml"
    task.write_text(TASK_TOML)
    return (
        task,
        write_jsonl(tmp / "train.jsonl", make_samples(train, seed=1)),
        write_jsonl(tmp / "test.jsonl", make_samples(holdout, seed=2)),
    )


@pytest.mark.integration
def test_try_tunes_a_board_and_leaves_a_folder_that_keeps_working(tmp_path, tiny_backbone):
    task, train, holdout = files(tmp_path)
    work = tmp_path / "work"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidetune.cli",
            "try",
            "--task",
            str(task),
            "--train",
            str(train),
            "--holdout",
            str(holdout),
            "--backbone",
            str(tiny_backbone),
            "--workdir",
            str(work),
            "--json",
            str(tmp_path / "try.json"),
            "--keep-running",
            "--set",
            "train_on=server",  # the round through the server: bytes up and down to count
            "--set",
            "train_on=server",  # through broker, Redis and worker (by default a board trains alone)
            "--set",
            "label_epsilon=inf",
            "--set",
            "hyper.lr=0.003",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: lines.extend(iter(stdout.readline, "")), daemon=True)
    reader.start()
    agent = None
    try:
        deadline = time.monotonic() + 120
        while not any("keep running; Ctrl-C" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.3)
        out = "".join(lines)
        report = json.loads((tmp_path / "try.json").read_text())
        assert report["state"] == "done" and report["adapter_version"] == 1
        assert report["samples"] == report["forward_passes"] == 60 and report["holdout_texts"] == 30
        assert report["bytes_up"] > 0 and report["bytes_down"] > 0
        assert (
            "held-out accuracy on test.jsonl (30 texts, 2 classes): "
            f"{report['zero_shot_accuracy']:.3f} before (the backbone alone), "
            f"{report['tuned_accuracy']:.3f} after (adapter v1)"
        ) in out
        assert (
            f"the board sent {report['bytes_up'] / 1e6:.2f} MB" in out and "the round took" in out
        )
        assert "labels at label_epsilon = inf" in out

        # the board folder: absolute paths inside it, private files, and `edge predict` agrees with
        # the agent's own held-out figure
        conf = work / "board" / "edge.toml"
        settings = load_settings(EdgeSettings, conf)
        assert settings.label_epsilon == float("inf") and settings.hyper.lr == 0.003  # --set
        assert settings.train_on == report["train_on"] == "server"
        log = (work / "board" / "agent.log").read_text()
        assert "labels sent as they are: label_epsilon = inf" in log
        for p in (
            settings.state_dir,
            settings.task_file,
            settings.holdout_file,
            settings.backbone_dir,
            settings.password_file,
        ):
            assert p is not None and p.is_absolute() and p.exists(), p
        assert settings.holdout_file is not None and settings.password_file is not None
        assert settings.holdout_file.read_bytes() == holdout.read_bytes()
        assert (work / "board").stat().st_mode & 0o077 == 0
        assert settings.password_file.stat().st_mode & 0o077 == 0
        rows = [json.loads(line) for line in holdout.read_text().splitlines()]
        pred = sidetune("edge", "predict", "--config", str(conf), *(r["text"] for r in rows))
        assert pred.returncode == 0, pred.stderr
        said = [line.split("\t") for line in pred.stdout.splitlines()]
        assert all(s[2] == "adapter v1" for s in said)
        accuracy = sum(s[0] == r["label"] for s, r in zip(said, rows, strict=True)) / len(rows)
        # the agent keeps the held-out states in float16; a text within fp16 of a tie may flip
        assert abs(accuracy - report["tuned_accuracy"]) <= 1 / len(rows)

        # `sidetune edge run` on the folder, against the services `try --keep-running` keeps up
        agent = subprocess.Popen(
            [sys.executable, "-m", "sidetune.cli", "edge", "run", "--config", str(conf)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        write_jsonl(settings.state_dir / "inbox" / "more.jsonl", make_samples(20, seed=5))
        deadline = time.monotonic() + 60
        while True:
            trained = sidetune("edge", "train", "--config", str(conf))
            if trained.returncode == 0:
                break
            assert trained.returncode == 69 and time.monotonic() < deadline, trained.stderr
            time.sleep(0.5)
        deadline = time.monotonic() + 60
        while True:
            led = Ledger(settings.state_dir / "state.db")
            try:
                done = [
                    r for r in led.rounds() if r["round"] == 2 and r["state"] in ("done", "failed")
                ]
            finally:
                led.close()
            if done:
                break
            assert agent.poll() is None and time.monotonic() < deadline, "round 2 did not end"
            time.sleep(0.5)
        assert (
            done[0]["state"] == "done" and done[0]["samples"] == 80 and done[0]["new_samples"] == 20
        )
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(30) == 0
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        reader.join(10)
    assert rc == 0, "".join(lines)
    assert "[try] stopping" in "".join(lines)


@pytest.mark.integration
def test_try_with_the_agents_defaults_trains_on_the_board(tmp_path, tiny_backbone):
    """The agent's default (train_on = "board"): the round sends nothing, and try says so."""
    task, train, holdout = files(tmp_path, train=40, holdout=20)
    done = sidetune(
        "try",
        "--task",
        str(task),
        "--train",
        str(train),
        "--holdout",
        str(holdout),
        "--backbone",
        str(tiny_backbone),
        "--workdir",
        str(tmp_path / "w"),
        "--epochs",
        "3",
        "--json",
        str(tmp_path / "try.json"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "try.json").read_text())
    assert report["state"] == "done" and report["train_on"] == "board" and report["bytes_up"] == 0
    assert 'the board trained the side network itself (train_on = "board")' in done.stdout
    assert f"{report['tuned_accuracy']:.3f} after (adapter v1)" in done.stdout


def test_try_checks_its_inputs_before_it_starts_anything(
    tmp_path, tiny_backbone, capsys, monkeypatch
):
    task, train, holdout = files(tmp_path, train=4, holdout=2)
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_TASK)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": "a film", "label": "meh"}])
    base = ["--backbone", str(tiny_backbone), "--workdir", str(tmp_path / "w")]
    cases = [
        (
            ["--task", str(bad), "--train", str(train), "--holdout", str(holdout)],
            78,
            "' splendiferous' (class 'rotten') is unknown",
        ),
        (
            [
                "--task",
                str(task),
                "--train",
                str(tmp_path / "none.jsonl"),
                "--holdout",
                str(holdout),
            ],
            2,
            "not found",
        ),
        (
            ["--task", str(task), "--train", str(train), "--holdout", str(empty)],
            2,
            "has no usable line",
        ),
        (
            [
                "--task",
                str(task),
                "--train",
                str(train),
                "--holdout",
                str(holdout),
                "--epochs",
                "0",
            ],
            2,
            "--epochs must be positive",
        ),
    ]
    ok = ["--task", str(task), "--train", str(train), "--holdout", str(holdout)]
    cases += [
        (
            [*ok, "--set", "label_epsilon=-1"],
            78,
            "--set: label_epsilon: Input should be greater than 0",
        ),
        ([*ok, "--set", "hyper.nope=1"], 78, "--set: hyper.nope: Extra inputs are not permitted"),
        ([*ok, "--set", "state_dir=/tmp"], 2, "`sidetune try` sets state_dir itself"),
        ([*ok, "--set", "label_epsilon"], 2, "expected KEY=VALUE"),
    ]
    for argv, code, message in cases:
        rc = main(["try", *argv, *base])
        err = capsys.readouterr().err
        assert (rc, message in err) == (code, True), (argv, err)
    assert not (tmp_path / "w").exists()  # nothing started, nothing written
    # no --backbone and none exported: how to export one
    monkeypatch.setenv("SIDETUNE_HOME", str(tmp_path / "home"))
    rc = main(["try", "--task", str(task), "--train", str(train), "--holdout", str(holdout)])
    err = capsys.readouterr().err
    assert rc == 78 and "sidetune export --model smollm2-135m --out" in err
    # a work folder that holds a board already is not run over
    (tmp_path / "w" / "board" / "state").mkdir(parents=True)
    (tmp_path / "w" / "board" / "state" / "state.db").touch()
    rc = main(["try", "--task", str(task), "--train", str(train), "--holdout", str(holdout), *base])
    err = capsys.readouterr().err
    assert rc == 2 and "holds a board from an earlier `sidetune try`" in err
