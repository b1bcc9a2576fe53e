"""A classification task as the device defines it: prompt template, classes, verbalizers.

    [task]                      # the table is optional; top-level keys work too
    name = "sentiment"
    template = "Review: {text}\\nSentiment:"
    classes = ["negative", "positive"]
    verbalizers = [" negative", " positive"]   # or a table: {negative = " negative", ...}

A verbalizer is the word the backbone would say next for that class; it must be
a single token of the backbone's tokenizer. Write it as the model sees it after
the prompt: " positive" (leading space) for a byte-level BPE like SmolLM2's;
for a whitespace word-level tokenizer " positive" and "positive" are the same
token. ``deploy/task.example.toml`` documents every key; ``sidetune task init``
writes a task file and ``sidetune task check`` checks one against a backbone
(:func:`verbalizer_problems`, :func:`measure_fit`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas import toml
from schemas.errors import ConfigurationError

PLACEHOLDER = "{text}"
_KEYS = ("name", "template", "classes", "verbalizers")


class TaskError(ConfigurationError, ValueError):
    """A task definition is invalid; the message says what and where."""


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TaskError(f"{what} must be a list of strings, got {type(value).__name__}")
    for v in value:
        if not isinstance(v, str):
            raise TaskError(f"{what} must be a list of strings, got an item {v!r}")
    return tuple(value)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    template: str
    classes: tuple[str, ...]
    verbalizers: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise TaskError("task name must be a non-empty string")
        if not isinstance(self.template, str):
            raise TaskError(f"task {self.name!r}: template must be a string")
        if PLACEHOLDER not in self.template:
            raise TaskError(
                f"task {self.name!r}: template {self.template!r} has no {PLACEHOLDER} placeholder"
            )
        classes = _str_list(self.classes, f"task {self.name!r}: classes")
        verbalizers = _str_list(self.verbalizers, f"task {self.name!r}: verbalizers")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "verbalizers", verbalizers)
        if len(classes) < 2:
            raise TaskError(f"task {self.name!r}: needs at least 2 classes, got {len(classes)}")
        if any(not c.strip() for c in classes):
            raise TaskError(f"task {self.name!r}: class names must be non-empty")
        dup = sorted({c for c in classes if classes.count(c) > 1})
        if dup:
            raise TaskError(f"task {self.name!r}: duplicate classes: {', '.join(map(repr, dup))}")
        if len(verbalizers) != len(classes):
            raise TaskError(
                f"task {self.name!r}: {len(classes)} classes but {len(verbalizers)} verbalizers "
                "(one word per class)"
            )
        if any(not v.strip() for v in verbalizers):
            raise TaskError(f"task {self.name!r}: verbalizers must be non-empty words")
        dup = sorted({v for v in verbalizers if verbalizers.count(v) > 1})
        if dup:
            raise TaskError(
                f"task {self.name!r}: duplicate verbalizers: {', '.join(map(repr, dup))}"
            )

    # -- construction ----------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskSpec:
        if not isinstance(d, Mapping):
            raise TaskError(f"a task must be a table/dict, got {type(d).__name__}")
        if "task" in d and isinstance(d["task"], Mapping) and "template" not in d:
            d = d["task"]
        missing = [k for k in _KEYS if k not in d]
        if missing:
            raise TaskError(f"task definition lacks {', '.join(missing)}")
        unknown = sorted(set(d) - set(_KEYS) - {"description"})
        if unknown:
            raise TaskError(f"task definition has unknown keys: {', '.join(unknown)}")
        classes = _str_list(d["classes"], "classes")
        verbalizers = d["verbalizers"]
        if isinstance(verbalizers, Mapping):  # {class: word}
            extra = sorted(set(verbalizers) - set(classes))
            lacking = [c for c in classes if c not in verbalizers]
            if extra or lacking:
                raise TaskError(
                    "verbalizers table must name each class once"
                    + (f"; unknown classes: {', '.join(extra)}" if extra else "")
                    + (f"; missing: {', '.join(lacking)}" if lacking else "")
                )
            verbalizers = [verbalizers[c] for c in classes]
        return cls(
            name=d["name"],
            template=d["template"],
            classes=classes,
            verbalizers=_str_list(verbalizers, "verbalizers"),
        )

    @classmethod
    def from_toml(cls, path: str | Path) -> TaskSpec:
        p = Path(path)
        try:
            data = toml.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise TaskError(f"task file {str(p)!r} not found") from e
        except (OSError, UnicodeDecodeError) as e:
            raise TaskError(f"cannot read task file {str(p)!r}: {e}") from e
        except toml.TOMLDecodeError as e:
            raise TaskError(f"task file {str(p)!r} is not valid TOML: {e}") from e
        try:
            return cls.from_dict(data)
        except TaskError as e:
            raise TaskError(f"{p}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "template": self.template,
            "classes": list(self.classes),
            "verbalizers": list(self.verbalizers),
        }

    # -- use ---------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prompt(self, text: str) -> str:
        return self.template.replace(PLACEHOLDER, text)

    def label_index(self, label: str) -> int:
        try:
            return self.classes.index(label)
        except ValueError:
            raise TaskError(
                f"task {self.name!r}: unknown class {label!r} (classes: {', '.join(self.classes)})"
            ) from None

    def verbalizer_ids(self, backbone: Any) -> list[int]:
        """One token id per class; TaskError unless each verbalizer is exactly one known token
        (the message names every one that is not, and what to write instead)."""
        problems = verbalizer_problems(self, backbone)
        if problems:
            raise TaskError(f"task {self.name!r}: " + "; ".join(problems))
        return [single_token_id(backbone, w) for w in self.verbalizers]  # type: ignore[misc]

    def to_toml(self) -> str:
        """The task as a TOML file (``TaskSpec.from_toml`` reads it back unchanged)."""
        lines = [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in self.to_dict().items()]
        text = "\n".join(lines) + "\n"  # JSON strings and arrays of them are TOML values
        if TaskSpec.from_dict(toml.loads(text)) != self:
            raise TaskError(f"task {self.name!r} does not survive a TOML round trip")
        return text


# -- a task against a backbone's tokenizer ----------------------------------------


@dataclass(frozen=True)
class BackboneTokenizer:
    """What checking a task needs of an exported backbone: its tokenizer and manifest, without
    loading the ONNX graph (``Backbone`` has the same ``tokenizer`` and ``manifest``)."""

    tokenizer: Any  # tokenizers.Tokenizer
    manifest: Any  # schemas.manifest.BackboneManifest

    @classmethod
    def load(cls, directory: str | Path) -> BackboneTokenizer:
        from tokenizers import Tokenizer

        from schemas.manifest import BackboneError, read_manifest

        d = Path(directory).expanduser()
        manifest = read_manifest(d)  # BackboneError (78) when it is no exported backbone
        path = d / manifest.tokenizer_file
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exceptions
            raise BackboneError(f"cannot read the tokenizer {str(path)!r}: {e}") from None
        tok.no_truncation()
        tok.no_padding()
        return cls(tok, manifest)


def text_budget(backbone: Any, max_length: int) -> int:
    """Tokens left for the prompted text in a sequence of ``max_length`` (the backbone's special
    tokens take the rest), as ``Backbone.encode`` counts them."""
    m = backbone.manifest
    return int(max_length) - len(m.prefix_ids) - len(m.suffix_ids)


def _encode(backbone: Any, text: str) -> Any:
    return backbone.tokenizer.encode(text, add_special_tokens=False)


def single_token_id(backbone: Any, word: str) -> int | None:
    """The id of ``word`` when it is exactly one token the tokenizer knows, else None."""
    enc = _encode(backbone, word)
    unk = getattr(backbone.manifest, "unk_token_id", None)
    if len(enc.ids) != 1 or (unk is not None and enc.ids[0] == unk):
        return None
    return int(enc.ids[0])


def _alternatives(backbone: Any, word: str, taken: set[int]) -> list[str]:
    """Spellings near ``word`` that are one known token not taken by another class: its case, its
    words, its first piece when that is most of it (" HuffPost" -> " Huff"); with a leading space
    when ``word`` has one."""
    stem = word.strip()
    forms = [stem, stem.lower(), stem.capitalize(), *stem.split()]
    ids = _encode(backbone, word).ids
    if len(ids) > 1:
        first = backbone.tokenizer.decode([ids[0]]).strip()
        if len(first) >= max(3, len(stem.split()[0]) / 2):
            forms.append(first)
    seen: dict[int, str] = {}  # one spelling per token
    for form in forms:
        for cand in (" " + form,) if word.startswith(" ") else (" " + form, form):
            tid = single_token_id(backbone, cand) if cand != word and cand.strip() else None
            if tid is not None and tid not in taken and tid not in seen:
                seen[tid] = cand
    return list(seen.values())[:3]


def verbalizer_problems(task: TaskSpec, backbone: Any) -> list[str]:
    """One sentence per verbalizer that is not a single known token of ``backbone``'s tokenizer
    (or shares its token with another class), each saying what to write instead."""
    ids = [single_token_id(backbone, w) for w in task.verbalizers]
    out: list[str] = []
    for cls_name, word, tid in zip(task.classes, task.verbalizers, ids, strict=True):
        if tid is not None:
            continue
        enc = _encode(backbone, word)
        unk = getattr(backbone.manifest, "unk_token_id", None)
        if len(enc.ids) == 1 and enc.ids[0] == unk:
            what = f"is unknown to the backbone's tokenizer (maps to {enc.tokens[0]!r})"
        else:
            pieces = [backbone.tokenizer.decode([i]) for i in enc.ids]  # " Huff", not "ĠHuff"
            what = (f"is not a single token for this backbone: it splits into {pieces} "
                    f"{list(enc.ids)}")
        alts = _alternatives(backbone, word, {i for i in ids if i is not None})
        fix = (f"use {' or '.join(repr(a) for a in alts)}" if alts else
               "choose another word (a common word, usually with a leading space for a "
               "byte-level BPE such as SmolLM2's)")
        out.append(f"verbalizer {word!r} (class {cls_name!r}) {what}: {fix}")
    clash = sorted({i for i in ids if i is not None and ids.count(i) > 1})
    for tid in clash:
        words = [w for w, i in zip(task.verbalizers, ids) if i == tid]
        out.append(f"verbalizers {', '.join(map(repr, words))} are the same token ({tid}): "
                   "give each class its own word")
    return out


@dataclass(frozen=True)
class Fit:
    """How the prompted texts fit ``max_length``: ``cut`` of ``texts`` lose tokens."""

    texts: int
    cut: int
    longest: int  # the longest prompted text, in tokens (without the special tokens)
    budget: int  # tokens a prompted text may have


def measure_fit(backbone: Any, task: TaskSpec, texts: Sequence[str], max_length: int) -> Fit:
    """Tokenize each prompted text without truncation and count those over the budget; a causal
    backbone keeps their LAST tokens (the template's ending stays), an encoder their first."""
    budget = text_budget(backbone, max_length)
    prompts = [task.prompt(t) for t in texts]
    encoded = backbone.tokenizer.encode_batch(prompts, add_special_tokens=False)
    lengths = [len(e.ids) for e in encoded]
    return Fit(len(lengths), sum(n > budget for n in lengths), max(lengths, default=0), budget)
