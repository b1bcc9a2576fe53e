"""The README's Commands list against the CLI's own parsers: every subcommand and every flag of it is
listed, and the list names no flag a parser does not take.

The parsers are walked as they are built (``sidetune.cli.build_parser``), so a flag or subcommand
added to the CLI fails here until the README lists it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from sidetune.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def parsers(p: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of the top parser and of every subcommand below it."""
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


def flags(p: argparse.ArgumentParser) -> set[str]:
    """The long options a parser takes (its own --help aside)."""
    return {o for a in p._actions for o in a.option_strings
            if o.startswith("--") and not isinstance(a, argparse._HelpAction)}


def commands_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Commands\n+```\n(.*?)\n```", text, re.M | re.S)
    assert m, "README.md has no ## Commands section with a code block"
    return [line for line in m.group(1).splitlines() if line.strip()]


def listed() -> dict[tuple[str, ...], set[str]]:
    """Command path → the flags the README's lines for it name (``a|b`` lists both commands)."""
    known = dict(parsers(build_parser()))
    out: dict[tuple[str, ...], set[str]] = {}
    for line in commands_block():
        words = line.split("#", 1)[0].split()
        assert words[0] == "sidetune", f"a Commands line that is no sidetune command: {line!r}"
        paths: list[tuple[str, ...]] = [()]
        rest = words[1:]
        while rest and all((*paths[0], n) in known for n in rest[0].split("|")):
            paths = [(*p, n) for p in paths for n in rest[0].split("|")]
            rest = rest[1:]
        named = set(re.findall(r"--[a-z][a-z0-9-]*", " ".join(rest)))
        for path in paths:
            out.setdefault(path, set()).update(named)
    return out


def test_the_commands_list_names_every_subcommand_and_flag_and_no_other():
    known = dict(parsers(build_parser()))
    shown = listed()
    problems = []
    for path, p in known.items():
        own = flags(p)
        leaf = not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
        if path not in shown:
            if leaf or own - {"--version"} or (path == () and own):
                problems.append(f"`sidetune {' '.join(path)}` is not in the list"
                                + (f" (flags {', '.join(sorted(own))})" if own else ""))
            continue
        missing = own - shown[path]
        if missing:
            problems.append(f"`sidetune {' '.join(path)}` lacks {', '.join(sorted(missing))}")
    for path, named in shown.items():
        extra = named - flags(known[path])
        if extra:
            problems.append(f"`sidetune {' '.join(path)}` lists {', '.join(sorted(extra))}, "
                            "which it does not take")
    assert not problems, "README.md, ## Commands:\n" + "\n".join(problems)


def test_the_walk_sees_what_the_cli_parses():
    """The check above is only as good as its walk: it finds nested subcommands and their flags."""
    known = dict(parsers(build_parser()))
    assert {"--redis-port", "--bind", "--hostname"} <= flags(known[("broker", "init")])
    assert {"--broker-host", "--no-reload"} <= flags(known[("broker", "add-device")])
    assert "--json" in flags(known[("edge", "status")])
    assert "--version" in flags(known[()])
    shown = listed()
    assert ("edge", "run") in shown and ("edge", "train") in shown  # `edge run|train`
