"""edge_agent runtime on an exported tiny llama / bert: Backbone, TaskSpec, features, keys."""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_agent.backbone import Backbone, BackboneError
from edge_agent.evaluate import load_holdout
from edge_agent.features import FeatureExtractor, Features, default_taps, softmax
from edge_agent.keys import sample_key
from edge_agent.task import TaskError, TaskSpec

try:  # the same module object as the other test files use (one export cache)
    from tests.tiny_models import exported_tiny
except ImportError:  # tests/ itself on sys.path
    from tiny_models import exported_tiny

#: Runs with the edge extra alone (no torch, no redis): the board's Python 3.10 CI step too.
pytestmark = pytest.mark.edge

SENTIMENT = {
    "name": "sentiment",
    "template": "Review: {text}\nSentiment:",
    "classes": ["negative", "positive"],
    "verbalizers": [" negative", " positive"],
}
TEXTS = [
    "a good movie",
    "the plot was boring and the acting was terrible , but the music was great !",
    "i loved it",
    "bad",
    "what a mess . the worst film of the year , too long and too slow .",
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return exported_tiny(tmp_path_factory, "llama")[0]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return exported_tiny(tmp_path_factory, "bert")[0]


@pytest.fixture(scope="module")
def bb(llama_dir) -> Backbone:
    return Backbone.load(llama_dir, threads=1)


@pytest.fixture(scope="module")
def enc(bert_dir) -> Backbone:
    return Backbone.load(bert_dir, threads=1)


@pytest.fixture
def task() -> TaskSpec:
    return TaskSpec.from_dict(SENTIMENT)


# -- Backbone -----------------------------------------------------------------


def test_load_attributes(bb, llama_dir):
    m = json.loads((llama_dir / "manifest.json").read_text())
    assert bb.manifest.to_json() == m
    assert (
        bb.fingerprint
        == m["fingerprint"]
        == hashlib.sha256((llama_dir / "backbone.onnx").read_bytes()
                          + (llama_dir / "backbone.onnx.data").read_bytes()).hexdigest()
    )
    assert (bb.num_layers, bb.hidden_size, bb.pivot) == (4, 32, "last")
    assert bb.has_logits and bb.add_bos
    assert "layers=4" in repr(bb)


def test_run_shapes_order_and_batching(bb):
    ids = bb.encode(TEXTS, max_length=64)
    states, logits = bb.run(ids, batch_size=2)
    assert states.dtype == np.float32 and states.shape == (len(TEXTS), 5, 32)
    assert (
        logits is not None
        and logits.dtype == np.float32
        and logits.shape == (len(TEXTS), bb.vocab_size)
    )
    # one at a time gives the same rows, in input order
    for i, s in enumerate(ids):
        st1, lg1 = bb.run([s])
        np.testing.assert_allclose(states[i], st1[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(logits[i], lg1[0], rtol=1e-4, atol=1e-5)
    # any batch size gives the same result
    st8, _ = bb.run(ids, batch_size=8)
    np.testing.assert_allclose(states, st8, rtol=1e-4, atol=1e-5)
    empty_states, empty_logits = bb.run([])
    assert empty_states.shape == (0, 5, 32) and empty_logits.shape == (0, bb.vocab_size)


def test_run_rejects_bad_ids(bb):
    with pytest.raises(ValueError, match="empty"):
        bb.run([[1, 2], []])
    with pytest.raises(ValueError, match="outside"):
        bb.run([[1, bb.vocab_size]])
    with pytest.raises(ValueError, match="outside"):
        bb.run([[1, -1]])
    with pytest.raises(ValueError, match="non-integer"):
        bb.run([[1.5, 2.0]])
    with pytest.raises(ValueError, match="batch_size"):
        bb.run([[1]], batch_size=0)


def test_encode_causal_truncation_keeps_suffix_and_bos(bb):
    words = " ".join(["good"] * 50 + ["bad"] * 5)
    text = f"Review: {words}\nSentiment:"
    full = bb.encode([text], max_length=256)[0]
    assert full[0] == bb.manifest.bos_token_id and len(full) == 1 + 2 + 55 + 2
    cut = bb.encode([text], max_length=10)[0]
    assert len(cut) == 10
    assert cut[0] == bb.manifest.bos_token_id  # BOS survives
    assert cut[1:] == full[-9:]  # the end of the prompt survives
    assert bb.tokenizer.decode(cut[-2:]) == "Sentiment :"
    short = bb.encode(["good"], max_length=10)[0]
    assert short == [bb.manifest.bos_token_id, bb.tokenizer.token_to_id("good")]
    with pytest.raises(ValueError, match="no room"):
        bb.encode(["good"], max_length=1)
    with pytest.raises(TypeError):
        bb.encode("good", max_length=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positions"):
        bb.encode(["good"], max_length=10_000)


def test_encode_encoder_truncation_keeps_prefix(enc):
    cls, sep = enc.manifest.cls_token_id, enc.manifest.sep_token_id
    text = " ".join(["good"] * 5 + ["bad"] * 50)
    full = enc.encode([text], max_length=128)[0]
    assert full[0] == cls and full[-1] == sep and len(full) == 57
    cut = enc.encode([text], max_length=8)[0]
    assert len(cut) == 8 and cut[0] == cls and cut[-1] == sep
    assert cut[1:-1] == full[1:7]  # the first tokens survive
    states, logits = enc.run([cut, full])
    assert logits is None and states.shape == (2, 3, 32)
    assert enc.pivot == "first" and not enc.has_logits


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_backbone_errors(llama_dir, tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        Backbone.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="no manifest.json"):
        Backbone.load(tmp_path / "empty")

    d = _copy(llama_dir, tmp_path / "corrupt")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(BackboneError, match="corrupt manifest"):
        Backbone.load(d)
    (d / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BackboneError, match="not a JSON object"):
        Backbone.load(d)
    good = json.loads((llama_dir / "manifest.json").read_text())
    for key in ("fingerprint", "num_layers", "pivot"):
        m = dict(good)
        del m[key]
        (d / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(BackboneError, match=f"missing {key}"):
            Backbone.load(d)
    (d / "manifest.json").write_text(json.dumps(dict(good, pivot="middle")))
    with pytest.raises(BackboneError, match="unknown pivot"):
        Backbone.load(d)
    (d / "manifest.json").write_text(json.dumps(dict(good, fingerprint="xyz")))
    with pytest.raises(BackboneError, match="sha256"):
        Backbone.load(d)

    d2 = _copy(llama_dir, tmp_path / "tampered")
    data = bytearray((d2 / "backbone.onnx").read_bytes())
    data[-1] ^= 1
    (d2 / "backbone.onnx").write_bytes(bytes(data))
    with pytest.raises(BackboneError, match="fingerprint mismatch"):
        Backbone.load(d2)

    d3 = _copy(llama_dir, tmp_path / "other-fp")
    (d3 / "manifest.json").write_text(json.dumps(dict(good, fingerprint="0" * 64)))
    with pytest.raises(BackboneError, match="fingerprint mismatch"):
        Backbone.load(d3)

    # the weights beside the graph are part of the fingerprint: one flipped bit is refused
    d5 = _copy(llama_dir, tmp_path / "tampered-weights")
    weights = bytearray((d5 / "backbone.onnx.data").read_bytes())
    weights[len(weights) // 2] ^= 1
    (d5 / "backbone.onnx.data").write_bytes(bytes(weights))
    with pytest.raises(BackboneError, match=r"fingerprint mismatch: backbone.onnx \+ backbone.onnx.data"):
        Backbone.load(d5)

    d4 = _copy(llama_dir, tmp_path / "no-onnx")
    (d4 / "backbone.onnx").unlink()
    with pytest.raises(BackboneError, match="lacks backbone.onnx"):
        Backbone.load(d4)

    d5 = _copy(llama_dir, tmp_path / "bad-tok")
    (d5 / "tokenizer.json").write_text("{}")
    with pytest.raises(BackboneError, match="corrupt tokenizer"):
        Backbone.load(d5)


# -- TaskSpec -----------------------------------------------------------------


def test_task_from_dict_and_prompt(task):
    assert task.classes == ("negative", "positive") and task.num_classes == 2
    assert task.prompt("a {weird} text") == "Review: a {weird} text\nSentiment:"
    assert task.label_index("positive") == 1
    with pytest.raises(TaskError, match="unknown class"):
        task.label_index("meh")
    assert TaskSpec.from_dict(task.to_dict()) == task
    hash(task)  # frozen, hashable
    with pytest.raises(AttributeError):
        task.name = "x"  # type: ignore[misc]
    table = dict(SENTIMENT, verbalizers={"positive": " positive", "negative": " negative"})
    assert TaskSpec.from_dict(table) == task


def test_task_from_toml(tmp_path, task):
    top = tmp_path / "top.toml"
    top.write_text(
        'name = "sentiment"\ntemplate = "Review: {text}\\nSentiment:"\n'
        'classes = ["negative", "positive"]\nverbalizers = [" negative", " positive"]\n'
    )
    assert TaskSpec.from_toml(top) == task
    table = tmp_path / "table.toml"
    table.write_text("[task]\n" + top.read_text())
    assert TaskSpec.from_toml(table) == task
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ")
    with pytest.raises(TaskError, match="not valid TOML"):
        TaskSpec.from_toml(bad)
    with pytest.raises(TaskError, match="not found"):
        TaskSpec.from_toml(tmp_path / "missing.toml")
    partial = tmp_path / "partial.toml"
    partial.write_text('name = "x"\ntemplate = "{text}"\n')
    with pytest.raises(TaskError, match=r"partial.toml.*lacks classes, verbalizers"):
        TaskSpec.from_toml(partial)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"template": "Review: text\nSentiment:"}, r"no \{text\} placeholder"),
        ({"classes": ["positive"], "verbalizers": [" positive"]}, "at least 2 classes"),
        ({"classes": ["a", "a"]}, "duplicate classes: 'a'"),
        ({"verbalizers": [" positive", " positive"]}, "duplicate verbalizers"),
        ({"verbalizers": [" negative"]}, "2 classes but 1 verbalizers"),
        ({"classes": "negative,positive"}, "list of strings"),
        ({"classes": ["negative", 3]}, "list of strings"),
        ({"name": ""}, "name must be a non-empty"),
        ({"verbalizers": [" negative", " "]}, "non-empty words"),
        ({"verbalizers": {"negative": " no"}}, "missing: positive"),
    ],
)
def test_task_validation(change, message):
    with pytest.raises(TaskError, match=message):
        TaskSpec.from_dict(dict(SENTIMENT, **change))


def test_task_missing_keys():
    with pytest.raises(TaskError, match="lacks template, verbalizers"):
        TaskSpec.from_dict({"name": "x", "classes": ["a", "b"]})
    with pytest.raises(TaskError, match="must be a table"):
        TaskSpec.from_dict(["x"])  # type: ignore[arg-type]
    assert isinstance(TaskError("x"), ValueError)


def test_verbalizer_ids(bb, task):
    ids = task.verbalizer_ids(bb)
    assert ids == [bb.tokenizer.token_to_id("negative"), bb.tokenizer.token_to_id("positive")]
    # with or without the leading space on a whitespace word-level tokenizer
    no_space = TaskSpec.from_dict(dict(SENTIMENT, verbalizers=["negative", "positive"]))
    assert no_space.verbalizer_ids(bb) == ids
    multi = TaskSpec.from_dict(dict(SENTIMENT, verbalizers=[" very bad", " good"]))
    with pytest.raises(TaskError, match=r"' very bad'.*not a single token.*\['very', 'bad'\]"):
        multi.verbalizer_ids(bb)
    unknown = TaskSpec.from_dict(dict(SENTIMENT, verbalizers=[" splendiferous", " good"]))
    with pytest.raises(TaskError, match="' splendiferous'.*unknown"):
        unknown.verbalizer_ids(bb)


# -- features -------------------------------------------------------------------


def test_default_taps():
    assert default_taps(30) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert default_taps(4) == [3, 4]
    assert default_taps(6) == [3, 6]
    assert default_taps(3) == [3]
    assert default_taps(2) == [2]
    assert default_taps(1) == [1]
    with pytest.raises(ValueError):
        default_taps(0)


def test_extract(bb, task):
    fx = FeatureExtractor(bb, task, max_length=32, batch_size=2)
    f = fx.extract(TEXTS)
    assert isinstance(f, Features) and len(f) == len(TEXTS)
    assert f.token_ids == bb.encode([task.prompt(t) for t in TEXTS], 32)
    assert f.token_ids == fx.token_ids(TEXTS)
    assert all(len(t) <= 32 for t in f.token_ids)
    assert f.states.dtype == np.float32 and f.states.shape == (len(TEXTS), 5, 32)
    assert f.prior.dtype == np.float32 and f.prior.shape == (len(TEXTS), 2)
    np.testing.assert_allclose(f.prior.sum(1), 1.0, rtol=1e-6)
    states, logits = bb.run(f.token_ids)
    np.testing.assert_allclose(f.states, states, rtol=1e-4, atol=1e-5)
    vid = task.verbalizer_ids(bb)
    np.testing.assert_allclose(f.prior, softmax(logits[:, vid]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(f.prior, 0.5)  # a real prior, not the uniform fallback
    empty = fx.extract([])
    assert (
        empty.states.shape == (0, 5, 32) and empty.prior.shape == (0, 2) and empty.token_ids == []
    )
    with pytest.raises(TypeError):
        fx.extract("one text")  # type: ignore[arg-type]


def test_held_out_features_are_cached_per_task(bb, task, tmp_path):
    """The held-out cache is keyed by the file, the backbone and the prompt: a new template must
    not reuse the features computed under the old one."""
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": t, "label": "positive" if i % 2 else "negative"}) + "\n"
                            for i, t in enumerate(TEXTS)))
    first = load_holdout(held, FeatureExtractor(bb, task, max_length=32), tmp_path)
    again = load_holdout(held, FeatureExtractor(bb, task, max_length=32), tmp_path)
    np.testing.assert_array_equal(first.prior, again.prior)
    assert len(list(tmp_path.glob("holdout-*.npz"))) == 1
    other = TaskSpec.from_dict({**SENTIMENT, "template": "Is this review good? {text} Answer:"})
    fx = FeatureExtractor(bb, other, max_length=32)
    changed = load_holdout(held, fx, tmp_path)
    assert len(list(tmp_path.glob("holdout-*.npz"))) == 2
    np.testing.assert_allclose(changed.prior, fx.extract(TEXTS).prior, rtol=1e-5, atol=1e-6)
    assert not np.allclose(changed.prior, first.prior)


def test_extract_encoder_uniform_prior(enc, task):
    three = TaskSpec("t", "{text}", ["a", "b", "c"], ["good", "bad", "dull"])
    fx = FeatureExtractor(enc, three, max_length=16)
    f = fx.extract(TEXTS)
    assert f.states.shape == (len(TEXTS), 3, 32)
    np.testing.assert_array_equal(f.prior, np.full((len(TEXTS), 3), 1 / 3, np.float32))
    assert all(
        t[0] == enc.manifest.cls_token_id and t[-1] == enc.manifest.sep_token_id
        for t in f.token_ids
    )


def test_extractor_checks_task_up_front(bb):
    bad = TaskSpec("t", "{text}", ["a", "b"], ["very good", "bad"])
    with pytest.raises(TaskError, match="not a single token"):
        FeatureExtractor(bb, bad)


# -- keys -----------------------------------------------------------------------

FP = "ab" * 32


def test_sample_key_format_and_vector():
    key = sample_key(b"secret", FP, "last", [1, 2, 3])
    assert len(key) == 64 and key == key.lower() and int(key, 16) >= 0
    msg = b"sidetune-key-v1\0" + FP.encode() + b"\0last\0" + np.asarray([1, 2, 3], "<i8").tobytes()
    assert key == hmac.new(b"secret", msg, hashlib.sha256).hexdigest()
    # fixed vector: changing the encoding invalidates every cache -> must be deliberate
    assert key == "c32af1eae22303b5701c9a0b245def4c729c852ca86196f9ac735f49083926c6"


def test_sample_key_stable_and_sensitive():
    base = sample_key(b"secret", FP, "last", [1, 2, 3])
    assert base == sample_key(b"secret", FP, "last", (1, 2, 3))
    assert base == sample_key(b"secret", FP, "last", np.array([1, 2, 3], dtype=np.int32))
    assert base == sample_key(bytearray(b"secret"), FP, "last", [1, 2, 3])
    others = {
        sample_key(b"secret2", FP, "last", [1, 2, 3]),
        sample_key(b"secret", "cd" * 32, "last", [1, 2, 3]),
        sample_key(b"secret", FP, "first", [1, 2, 3]),
        sample_key(b"secret", FP, "last", [1, 2, 4]),
        sample_key(b"secret", FP, "last", [3, 2, 1]),
        sample_key(b"secret", FP, "last", [1, 2, 3, 0]),
        sample_key(b"secret", FP, "last", [1, 2]),
        sample_key(b"secret", FP, "last", [258]),  # not confused with bytes 1, 2
    }
    assert base not in others and len(others) == 8
    # field boundaries are unambiguous
    assert sample_key(b"s", "ab", "c", [1]) != sample_key(b"s", "a", "bc", [1])


def test_sample_key_errors():
    with pytest.raises(ValueError, match="secret"):
        sample_key(b"", FP, "last", [1])
    with pytest.raises(ValueError, match="secret"):
        sample_key("secret", FP, "last", [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integers"):
        sample_key(b"s", FP, "last", [1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        sample_key(b"s", FP, "last", [-1])
    with pytest.raises(ValueError, match="pivot"):
        sample_key(b"s", FP, "", [1])
    with pytest.raises(ValueError, match="fingerprint"):
        sample_key(b"s", "a\0b", "last", [1])


def test_keys_from_features(bb, task):
    fx = FeatureExtractor(bb, task, max_length=32)
    f = fx.extract(TEXTS[:2] + TEXTS[:1])
    keys = [sample_key(b"k", bb.fingerprint, bb.pivot, ids) for ids in f.token_ids]
    assert keys[0] == keys[2] != keys[1]
