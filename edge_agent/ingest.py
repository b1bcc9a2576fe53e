"""Inbox ingestion: files an application dropped → keyed samples in the ledger.

Nothing runs the backbone here: the text is prompted and tokenized, the key is
derived from the token ids (HMAC under the device secret), and the sample waits
for the next round's forward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from edge_agent.inbox import finish_file, parse_jsonl, pending_files
from edge_agent.keys import sample_key
from edge_agent.ledger import Ledger
from edge_agent.model import LocalModel
from edge_agent.task import measure_fit

log = logging.getLogger("sidetune.edge.inbox")

#: Texts tokenized between two watchdog pets (a fast tokenizer does thousands a second).
CHUNK = 512


def ingest_inbox(inbox: Path, model: LocalModel, ledger: Ledger, pet: Callable[[], None] = lambda: None) -> int:
    """Read every finished file in ``inbox`` once; return how many new samples it added."""
    added = 0
    for path in pending_files(inbox):
        parsed = parse_jsonl(path, model.task.classes)
        rows = []
        for i in range(0, len(parsed.good), CHUNK):
            part = parsed.good[i : i + CHUNK]
            for (_, label), tok in zip(part, model.fx.token_ids([t for t, _ in part])):
                key = sample_key(model.secret.key, model.backbone.fingerprint, model.spec.key_scope(model.backbone.pivot), tok)
                rows.append((key, model.task.label_index(label), tok))
            pet()
        new = ledger.add_samples(rows)
        finish_file(inbox, path, list(parsed.errors))
        added += new
        log.info("inbox: %s: %d samples (%d new, %d duplicates), %d bad lines skipped", path.name,
                 len(rows), new, len(rows) - new, len(parsed.errors))
        _log_cut(path.name, model, [t for t, _ in parsed.good])
    return added


def _log_cut(name: str, model: LocalModel, texts: list[str]) -> None:
    """One line per file when prompted texts are longer than max_length allows (they were cut)."""
    fit = measure_fit(model.backbone, model.task, texts, model.fx.max_length)
    if fit.cut:
        kept = "last" if model.backbone.pivot == "last" else "first"
        log.warning("inbox: %s: %d of %d texts were cut to max_length %d: their prompt is longer than "
                    "%d tokens (the longest %d); the %s %d were kept (`sidetune task check --texts` "
                    "counts them; raise max_length in edge.toml to keep more)", name, fit.cut, fit.texts,
                    model.fx.max_length, fit.budget, fit.longest, kept, fit.budget)
