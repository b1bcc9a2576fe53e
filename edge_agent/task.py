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
token.
"""

from __future__ import annotations

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
        """One token id per class; TaskError unless each verbalizer is exactly one known token."""
        tok = backbone.tokenizer
        unk = getattr(getattr(backbone, "manifest", None), "unk_token_id", None)
        ids: list[int] = []
        for cls_name, word in zip(self.classes, self.verbalizers, strict=True):
            enc = tok.encode(word, add_special_tokens=False)
            if len(enc.ids) != 1:
                raise TaskError(
                    f"task {self.name!r}: verbalizer {word!r} (class {cls_name!r}) is not a single token "
                    f"for this backbone: it splits into {list(enc.tokens)} {list(enc.ids)}"
                )
            if unk is not None and enc.ids[0] == unk:
                raise TaskError(
                    f"task {self.name!r}: verbalizer {word!r} (class {cls_name!r}) is unknown to the "
                    f"backbone's tokenizer (maps to {enc.tokens[0]!r})"
                )
            ids.append(int(enc.ids[0]))
        if len(set(ids)) != len(ids):
            raise TaskError(
                f"task {self.name!r}: verbalizers {list(self.verbalizers)} map to the same tokens {ids}"
            )
        return ids
