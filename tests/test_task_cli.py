"""`sidetune task init` and `sidetune task check` on the tiny backbone's real tokenizer; the task
file's
documentation (deploy/task.example.toml) against the code that reads it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edge_agent.task import BackboneTokenizer, TaskSpec, measure_fit
from schemas import toml
from sidetune.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_init_writes_a_task_the_agent_reads(tmp_path, tiny_backbone, capsys):
    out = tmp_path / "task.toml"
    rc, said, err = run(
        capsys,
        "task",
        "init",
        "--out",
        str(out),
        "--name",
        "films",
        "--template",
        "Review: {text}\\nSentiment:",
        "--class",
        "fresh=positive",
        "--class",
        "rotten= negative",
        "--backbone",
        str(tiny_backbone),
    )
    assert rc == 0, err
    task = TaskSpec.from_toml(out)
    assert task == TaskSpec(
        "films", "Review: {text}\nSentiment:", ("fresh", "rotten"), ("positive", " negative")
    )
    assert "2 classes, each verbalizer one token" in said and f"sidetune task check {out}" in said
    # a label without =WORD gets the label after a space; an existing file needs --force
    rc, _, err = run(
        capsys,
        "task",
        "init",
        "--out",
        str(out),
        "--name",
        "x",
        "--template",
        "{text}",
        "--class",
        "good",
        "--class",
        "bad",
        "--backbone",
        str(tiny_backbone),
    )
    assert rc == 2 and "exists: pass --force" in err
    rc, _, err = run(
        capsys,
        "task",
        "init",
        "--out",
        str(out),
        "--name",
        "x",
        "--template",
        "{text} is",
        "--class",
        "good",
        "--class",
        "bad",
        "--backbone",
        str(tiny_backbone),
        "--force",
    )
    assert rc == 0, err
    assert TaskSpec.from_toml(out).verbalizers == (" good", " bad")


def test_init_refuses_verbalizers_that_are_not_one_token_and_says_what_to_write(
    tmp_path, tiny_backbone, capsys
):
    out = tmp_path / "task.toml"
    rc, _, err = run(
        capsys,
        "task",
        "init",
        "--out",
        str(out),
        "--name",
        "films",
        "--template",
        "T: {text}",
        "--class",
        "good= very good",
        "--class",
        "bad= splendiferous",
        "--backbone",
        str(tiny_backbone),
    )
    assert rc == 78 and not out.exists()
    assert err.count("\n") == 1 and "Traceback" not in err  # one line
    assert re.search(
        r"' very good' \(class 'good'\) is not a single token.*\['very', 'good'\].*use ' very'", err
    )
    assert "' splendiferous' (class 'bad') is unknown to the backbone's tokenizer" in err
    assert "choose another word" in err
    # two classes on one token
    rc, _, err = run(
        capsys,
        "task",
        "init",
        "--out",
        str(out),
        "--name",
        "films",
        "--template",
        "T: {text}",
        "--class",
        "good=good",
        "--class",
        "bad= good",
        "--backbone",
        str(tiny_backbone),
    )
    assert rc == 78 and "are the same token" in err


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (
            ["--template", "no placeholder", "--class", "a", "--class", "b"],
            78,
            "has no {text} placeholder",
        ),
        (["--template", "{text}", "--class", "good"], 78, "needs at least 2 classes"),
        (["--class", "good", "--class", "bad"], 2, "--template TEXT or --template-file FILE"),
        (
            ["--template", "{text}", "--class", "=x", "--class", "bad"],
            2,
            "expected LABEL or LABEL=WORD",
        ),
    ],
)
def test_init_bad_input(tmp_path, tiny_backbone, capsys, argv, code, message):
    rc, _, err = run(
        capsys,
        "task",
        "init",
        "--out",
        str(tmp_path / "t.toml"),
        "--name",
        "x",
        "--backbone",
        str(tiny_backbone),
        *argv,
    )
    assert (rc, message in err) == (code, True), err


def test_a_template_file_is_read_verbatim(tmp_path, tiny_backbone, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text('Say "yes" or "no" \\ then:\n\n{text}\nAnswer:\n')
    rc, _, err = run(
        capsys,
        "task",
        "init",
        "--out",
        str(tmp_path / "t.toml"),
        "--name",
        "x",
        "--template-file",
        str(prompt),
        "--class",
        "yes",
        "--class",
        "no",
        "--backbone",
        str(tiny_backbone),
    )
    assert rc == 0, err
    assert (
        TaskSpec.from_toml(tmp_path / "t.toml").template
        == 'Say "yes" or "no" \\ then:\n\n{text}\nAnswer:'
    )


def _task(tmp_path: Path) -> Path:
    path = tmp_path / "task.toml"
    path.write_text(
        TaskSpec(
            "films", "Review: {text}\nSentiment:", ("fresh", "rotten"), (" positive", " negative")
        ).to_toml()
    )
    return path


def test_check_counts_the_texts_the_agent_would_cut(tmp_path, tiny_backbone, capsys):
    task = _task(tmp_path)
    texts = tmp_path / "train.jsonl"
    rows = [
        {"text": "a good film", "label": "fresh"},
        {"text": " ".join(["dull"] * 30), "label": "rotten"},
        {"text": "fine", "label": "meh"},
    ]
    texts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, said, err = run(
        capsys, "task", "check", str(task), "--backbone", str(tiny_backbone), "--texts", str(texts)
    )
    assert rc == 0, err
    assert "2 usable lines, 1 bad" in said and "unknown label 'meh'" in said
    assert "labels: fresh 1, rotten 1" in said and "every prompted text fits max_length 128" in said
    rc, said, err = run(
        capsys,
        "task",
        "check",
        str(task),
        "--backbone",
        str(tiny_backbone),
        "--texts",
        str(texts),
        "--max-length",
        "16",
    )
    # the tiny llama adds <s>: 15 tokens for the prompt; "Review: dull x30 \n Sentiment:" is 33
    assert (
        rc == 0
        and "1 of 2 prompted texts are longer than the 15 tokens max_length 16 leaves" in said
    ), err
    assert "(the longest: 34)" in said and "keeps their LAST 15 tokens" in said
    bb = BackboneTokenizer.load(tiny_backbone)
    fit = measure_fit(bb, TaskSpec.from_toml(task), [r["text"] for r in rows[:2]], 16)
    assert (fit.texts, fit.cut, fit.budget) == (2, 1, 15)


def test_check_errors(tmp_path, tiny_backbone, capsys):
    task = _task(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "x"\ntemplate = "{text}"\nclasses = ["a", "b"]\n'
        'verbalizers = [" good", " awfully"]\n'
    )
    long = tmp_path / "long.toml"
    long.write_text(
        TaskSpec(
            "x", "the the the the the the the {text} :", ("a", "b"), (" good", " bad")
        ).to_toml()
    )
    cases = [
        (
            ["task", "check", str(bad), "--backbone", str(tiny_backbone)],
            78,
            "' awfully' (class 'b') is unknown",
        ),
        (
            ["task", "check", str(tmp_path / "none.toml"), "--backbone", str(tiny_backbone)],
            78,
            "not found",
        ),
        (
            ["task", "check", str(task), "--backbone", str(tmp_path)],
            78,
            "is not an exported backbone",
        ),
        (
            ["task", "check", str(task), "--backbone", str(tiny_backbone), "--texts", "nope.jsonl"],
            2,
            "not found",
        ),
        (
            ["task", "check", str(long), "--backbone", str(tiny_backbone), "--max-length", "9"],
            78,
            "leaving no room for the text",
        ),
        (
            ["task", "check", str(task), "--backbone", str(tiny_backbone), "--max-length", "4"],
            2,
            "8 to 4096",
        ),
    ]
    for argv, code, message in cases:
        rc, _, err = run(capsys, *argv)
        assert (rc, message in err, "Traceback" in err) == (code, True, False), (argv, err)


def test_no_backbone_says_how_to_export_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SIDETUNE_HOME", str(tmp_path / "home"))
    rc, _, err = run(capsys, "task", "check", str(_task(tmp_path)))
    assert (
        rc == 78
        and "sidetune export --model smollm2-135m --out" in err
        and str(tmp_path / "home") in err
    )


def test_the_example_task_file_documents_every_key_the_code_reads():
    """deploy/task.example.toml: each key TaskSpec reads has a comment of its own, and the file is
    a task."""
    from edge_agent import task as task_module

    text = (ROOT / "deploy" / "task.example.toml").read_text()
    TaskSpec.from_dict(toml.loads(text))
    commented = set(re.findall(r"^# ([a-z_]+): ", text, re.M))
    assert commented == {*task_module._KEYS, "description"}
    assert "# description = " in text  # optional: shown, not set (the demo's task is this file)
