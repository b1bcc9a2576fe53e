"""``sidetune task init`` and ``sidetune task check``: a task file, written and checked against a
backbone.

    sidetune task init --out task.toml --name topics --template 'Text: {text}\\nTopic:' \\
        --class world --class sports=" sport" --class business [--backbone DIR]
    sidetune task check task.toml [--backbone DIR] [--texts train.jsonl] [--max-length 128]

Both read only the backbone's ``manifest.json`` and ``tokenizer.json`` (not its graph): each
verbalizer must be ONE token the tokenizer knows (a message says what to write instead), the
template must hold ``{text}`` and leave room for it within ``max_length`` (the agent's
``max_length``, 128 by default), and ``check --texts`` counts the texts the agent would cut.
A bad task exits 78 (a configuration error, as the agent would), bad usage 2.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from edge_agent.task import (
    BackboneTokenizer,
    TaskError,
    TaskSpec,
    measure_fit,
    single_token_id,
    text_budget,
    verbalizer_problems,
)
from schemas.errors import ConfigurationError, ExitCode, UsageError

#: The agent's default max_length (edge_agent/config.py).
DEFAULT_MAX_LENGTH = 128


def resolve_backbone(arg: str | Path | None) -> Path:
    """The exported backbone folder: ``arg``, else the demo's (``~/.cache/sidetune/backbones/
    smollm2-135m``) when it was exported; otherwise a ConfigurationError that says how to export
    one."""
    from sidetune.demo import default_backbone_dir

    if arg is not None:
        p = Path(arg).expanduser()
        if not (p / "manifest.json").is_file():
            raise ConfigurationError(
                f"{p} is not an exported backbone (no manifest.json): export one "
                "with `sidetune export --model smollm2-135m --out DIR`"
            )
        return p
    p = default_backbone_dir()
    if not (p / "manifest.json").is_file():
        raise ConfigurationError(
            f"no backbone given and none exported in {p}: pass --backbone DIR (a folder written by "
            f"`sidetune export`), or export SmolLM2-135M-Instruct there with `sidetune export "
            f"--model "
            f"smollm2-135m --out {p}` (about a minute; `sidetune demo` does it on first use)"
        )
    return p


def check_task(task: TaskSpec, bb: BackboneTokenizer, max_length: int) -> list[str]:
    """Report lines for ``task`` against the tokenizer; TaskError (78) with every problem found."""
    if not 8 <= max_length <= 4096:
        raise UsageError(f"--max-length {max_length}: the agent takes 8 to 4096")
    problems = verbalizer_problems(task, bb)
    budget = text_budget(bb, max_length)
    bare = len(bb.tokenizer.encode(task.prompt(""), add_special_tokens=False).ids)
    if budget < 1 or bare >= budget:
        problems.append(
            f"the template alone takes {bare} tokens, leaving no room for the text within "
            f"max_length {max_length} ({budget} tokens beside the special tokens): shorten it "
            "or raise max_length in edge.toml"
        )
    if problems:
        raise TaskError(f"task {task.name!r}: " + "; ".join(problems))
    ids = task.verbalizer_ids(bb)
    words = ", ".join(f"{c} {w!r} (id {i})" for c, w, i in zip(task.classes, task.verbalizers, ids))
    lines = [
        f"task {task.name!r}: {task.num_classes} classes, each verbalizer one token: {words}",
        f"template: has {{text}}; {bare} tokens without the text, {budget - bare} left for it "
        "within "
        f"max_length {max_length}",
    ]
    if not task.template.endswith((" ", "\n")):
        for word, tid in zip(task.verbalizers, ids):
            spaced = single_token_id(bb, " " + word) if not word.startswith(" ") else None
            if spaced is not None and spaced != tid:
                lines.append(
                    f"note: {word!r} has no leading space, but after the template's last word "
                    f"the model says words with one: {' ' + word!r} is one token too"
                )
    return lines


def fit_lines(task: TaskSpec, bb: BackboneTokenizer, path: Path, max_length: int) -> list[str]:
    """What the agent makes of a JSONL file of ``{"text", "label"}``: bad lines, labels, cuts."""
    from edge_agent.inbox import parse_jsonl

    if not path.is_file():
        raise UsageError(f"texts file {str(path)!r} not found")
    parsed = parse_jsonl(path, task.classes)
    out = [
        f"{path}: {len(parsed.good)} usable lines"
        + (
            f", {len(parsed.errors)} bad (the agent skips them), e.g. {parsed.errors[0]}"
            if parsed.errors
            else ""
        )
    ]
    if not parsed.good:
        raise UsageError(f"{path} has no usable line ({'; '.join(parsed.errors[:3]) or 'empty'})")
    counts = collections.Counter(label for _, label in parsed.good)
    out.append("  labels: " + ", ".join(f"{c} {counts.get(c, 0)}" for c in task.classes))
    fit = measure_fit(bb, task, [t for t, _ in parsed.good], max_length)
    if fit.cut:
        kept = "LAST" if bb.manifest.pivot == "last" else "FIRST"
        room = (
            f"max_length {max_length}"
            if fit.budget == max_length
            else f"the {fit.budget} tokens max_length {max_length} leaves"
        )
        out.append(
            f"  {fit.cut} of {fit.texts} prompted texts are longer than {room} "
            f"(the longest: {fit.longest}): the agent keeps their "
            f"{kept} {fit.budget} tokens (raise max_length in edge.toml to keep more, at the cost "
            "of slower forward passes)"
        )
    else:
        out.append(
            f"  every prompted text fits max_length {max_length} (the longest: {fit.longest} of "
            f"{fit.budget} tokens)"
        )
    return out


def cmd_check(args: argparse.Namespace) -> int:
    task = TaskSpec.from_toml(args.task)  # TaskError: exit 78
    backbone = resolve_backbone(args.backbone)
    bb = BackboneTokenizer.load(backbone)
    for line in check_task(task, bb, args.max_length):
        print(line)
    for path in args.texts or []:
        for line in fit_lines(task, bb, Path(path), args.max_length):
            print(line)
    print(f"ok: {args.task} works with the backbone in {backbone}")
    return ExitCode.OK


def _template(args: argparse.Namespace) -> str:
    if (args.template is None) == (args.template_file is None):
        raise UsageError(
            "give the prompt with --template TEXT or --template-file FILE (one of the two)"
        )
    if args.template_file is not None:
        try:
            text = Path(args.template_file).read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"cannot read {args.template_file}: {e.strerror or e}") from None
        return (
            text[:-1] if text.endswith("\n") else text
        )  # an editor's final newline is not the prompt's
    return str(args.template).replace("\\n", "\n").replace("\\t", "\t")


def _classes(specs: list[str]) -> tuple[list[str], list[str]]:
    classes, words = [], []
    for spec in specs:
        label, eq, word = spec.partition("=")
        if not label.strip():
            raise UsageError(f"--class {spec!r}: expected LABEL or LABEL=WORD")
        classes.append(label)
        words.append(
            word if eq else " " + label
        )  # a leading space: how a BPE sees a word after the prompt
    return classes, words


def cmd_init(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists: pass --force to replace it")
    classes, words = _classes(args.classes or [])
    task = TaskSpec(
        name=args.name, template=_template(args), classes=tuple(classes), verbalizers=tuple(words)
    )  # TaskError (78) names what is wrong
    bb = BackboneTokenizer.load(resolve_backbone(args.backbone))
    lines = check_task(task, bb, args.max_length)  # nothing is written for a task that cannot work
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(task.to_toml(), encoding="utf-8")
    for line in lines:
        print(line)
    print(f"wrote {out}; check your texts against it: sidetune task check {out} --texts FILE.jsonl")
    return ExitCode.OK


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `sidetune task init|check` to the CLI's subparsers."""
    task = sub.add_parser("task", help="write a task file, or check one against a backbone")
    tsub = task.add_subparsers(dest="task_cmd", required=True, metavar="COMMAND")

    init = tsub.add_parser(
        "init", help="write a task file from its classes, verbalizers and prompt"
    )
    init.add_argument("--out", required=True, help="the task file to write (e.g. task.toml)")
    init.add_argument("--name", required=True, help="the task's name")
    init.add_argument(
        "--template",
        default=None,
        help="the prompt, with {text} where the text goes (\\n and \\t become a newline and a tab)",
    )
    init.add_argument(
        "--template-file", default=None, help="... or a file holding the prompt, verbatim"
    )
    init.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="LABEL[=WORD]",
        help="a class (its label in the JSONL files) and its verbalizer, the one token the "
        "model would say next for it (default: the label after a space); repeat per class",
    )
    init.add_argument("--force", action="store_true", help="replace an existing file")
    _common(init)
    init.set_defaults(func=cmd_init)

    check = tsub.add_parser("check", help="check a task file against a backbone (and texts)")
    check.add_argument("task", metavar="TASK", help="the task file (TOML)")
    check.add_argument(
        "--texts",
        action="append",
        metavar="FILE",
        help='a JSONL file of {"text", "label"}: bad lines, labels, texts cut (repeatable)',
    )
    _common(check)
    check.set_defaults(func=cmd_check)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        default=None,
        help="an exported backbone folder (default: the demo's, if it was exported)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=DEFAULT_MAX_LENGTH,
        help=f"the agent's max_length (default {DEFAULT_MAX_LENGTH})",
    )
