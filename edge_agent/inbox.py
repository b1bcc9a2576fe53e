"""The inbox folder: applications drop JSONL files of ``{"text": ..., "label": ...}``.

Write, then rename: only names ending in ``.jsonl`` are read, and a file is read
as soon as it appears, so an application writes ``NAME.jsonl.part`` (any other
suffix) and renames it to ``NAME.jsonl`` once it is complete (a rename within one
filesystem is atomic); a file written in place may be read half-written.

A file is read whole, its good lines stored in the ledger in one transaction,
then moved to ``processed/``; bad lines are reported (file, line, why) in the
log and in ``rejected/<file>.errors`` and skipped, never fatal.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("sidetune.edge.inbox")

MAX_TEXT_CHARS = 20_000


@dataclass
class Parsed:
    good: list[tuple[str, str]]  # (text, label)
    errors: list[str]


def parse_jsonl(path: Path, classes: tuple[str, ...], need_label: bool = True) -> Parsed:
    good: list[tuple[str, str]] = []
    errors: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        return Parsed([], [f"{path.name}: cannot read ({e})"])
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{path.name}:{n}: not JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{path.name}:{n}: expected an object with text and label")
            continue
        text, label = obj.get("text"), obj.get("label")
        if not isinstance(text, str) or not text.strip():
            errors.append(f"{path.name}:{n}: text must be a non-empty string")
            continue
        if len(text) > MAX_TEXT_CHARS:
            errors.append(f"{path.name}:{n}: text longer than {MAX_TEXT_CHARS} characters")
            continue
        if need_label and label not in classes:
            errors.append(f"{path.name}:{n}: unknown label {label!r} (expected one of {', '.join(classes)})")
            continue
        good.append((text, label if isinstance(label, str) else ""))
    return Parsed(good, errors)


def pending_files(inbox: Path) -> list[Path]:
    return sorted(p for p in inbox.glob("*.jsonl") if p.is_file())


def finish_file(inbox: Path, path: Path, errors: list[str]) -> None:
    (inbox / "processed").mkdir(exist_ok=True)
    if errors:
        (inbox / "rejected").mkdir(exist_ok=True)
        (inbox / "rejected" / f"{path.name}.errors").write_text("\n".join(errors) + "\n")
        for e in errors[:20]:
            log.warning("inbox: %s (skipped)", e)
        if len(errors) > 20:
            log.warning("inbox: %d more bad lines in %s (see rejected/)", len(errors) - 20, path.name)
    path.replace(inbox / "processed" / path.name)
