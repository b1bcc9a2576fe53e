"""Tiny randomly initialised Hugging Face models for tests (no hub, no network).

``make_tiny_llama(dir)`` and ``make_tiny_bert(dir)`` write a complete model
directory (``config.json``, ``model.safetensors``, ``tokenizer.json`` and the
tokenizer config) into ``dir`` and return it as a ``Path``. Both use a
word-level tokenizer with a whitespace pre-tokenizer built in code, so every
word of ``WORDS`` is a single token (the verbalizers ``positive`` and
``negative`` included, with or without a leading space). Unknown words map to
the unknown token. Both are deterministic for a given ``seed``.

The tiny llama mirrors SmolLM2's shape choices in miniature: grouped-query
attention, tied embeddings; its tokenizer prepends a BOS token (SmolLM2's
does not), so the runtime's "keep BOS when truncating" rule gets exercised.
The tiny bert is an encoder without a head (``BertModel``) whose tokenizer
wraps every text as ``[CLS] ... [SEP]``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from schemas.manifest import BackboneManifest, read_manifest

# Words every test or integration test may rely on being single tokens.
WORDS: tuple[str, ...] = tuple(
    """
    Review Sentiment Text Label Answer positive negative neutral fresh rotten yes no
    good bad great terrible awful excellent boring fun funny dull brilliant weak strong
    best worst love hate loved hated enjoy enjoyed like liked dislike movie film story
    plot acting actor actors cast director script scene scenes ending music score
    performance performances drama comedy thriller horror character characters dialogue
    visual effects minutes hour hours time year years people audience fans beautiful
    ugly smart stupid clever silly mess masterpiece disaster charming tedious
    predictable original moving touching slow fast long short little much many more
    most less least too very really quite rather so not never always ever just only
    even still also well better worse
    the a an and or but if of to in on at for with by from about as into than then it
    its this that these those there here what who how why when is are was were be been
    has have had do does did can could will would should i you he she we they me my
    your his her our their one two all some nothing something everything way thing
    things make makes made see seen watch watching feel feels
    : . , ! ? ' - ( ) " ; ...
    """.split()
)

LLAMA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _vocab(specials: tuple[str, ...]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for word in (*specials, *WORDS):
        if word not in vocab:
            vocab[word] = len(vocab)
    return vocab


def _word_level(vocab: dict[str, int], unk: str):
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tok


def tiny_llama_tokenizer():
    """The tiny llama's ``tokenizers.Tokenizer`` (prepends ``<s>``)."""
    from tokenizers import processors

    vocab = _vocab(LLAMA_SPECIALS)
    tok = _word_level(vocab, "<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return tok


def tiny_bert_tokenizer():
    """The tiny bert's ``tokenizers.Tokenizer`` (``[CLS] $A [SEP]``)."""
    from tokenizers import processors

    vocab = _vocab(BERT_SPECIALS)
    tok = _word_level(vocab, "[UNK]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tok


def _save_tiny(dir: str | Path, model_cls, config, tok, seed: int, **special_tokens: str) -> Path:
    """Seed torch, build ``model_cls(config)`` and write it, with ``tok`` as a fast tokenizer, into ``dir``."""
    import torch
    from transformers import PreTrainedTokenizerFast

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens).save_pretrained(out)
    return out


def make_tiny_llama(
    dir: str | Path, *, num_layers: int = 4, hidden_size: int = 32, seed: int = 0
) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` + tokenizer into ``dir``; return it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_llama_tokenizer()
    vocab = tok.get_vocab()
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        tie_word_embeddings=True,
        initializer_range=0.2,
        rms_norm_eps=1e-5,
    )
    return _save_tiny(dir, LlamaForCausalLM, config, tok, seed,
                      bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def make_tiny_bert(
    dir: str | Path, *, num_layers: int = 2, hidden_size: int = 32, seed: int = 0
) -> Path:
    """Write a tiny random ``BertModel`` (encoder, no head) + tokenizer into ``dir``."""
    from transformers import BertConfig, BertModel

    tok = tiny_bert_tokenizer()
    vocab = tok.get_vocab()
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=128,
        type_vocab_size=2,
        pad_token_id=vocab["[PAD]"],
        initializer_range=0.2,
    )
    return _save_tiny(dir, BertModel, config, tok, seed, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                      sep_token="[SEP]", mask_token="[MASK]")


_EXPORTS: dict[tuple[str, str | None, int], tuple[Path, BackboneManifest]] = {}

#: A folder of tiny backbones exported beforehand (``python -m tests.tiny_models DIR``), for test
#: environments without torch (the board's Python 3.10 step, scripts/test-py310): DIR/llama-fp32 ...
PREBUILT_ENV = "SIDETUNE_TEST_BACKBONES"


def exported_tiny(
    tmp_path_factory, kind: str = "llama", quantize: str | None = None
) -> tuple[Path, BackboneManifest]:
    """(backbone folder, manifest) of an exported tiny model, once per pytest session.

    ``kind`` is "llama" or "bert"; pass pytest's ``tmp_path_factory``. With
    ``$SIDETUNE_TEST_BACKBONES`` set, a copy of the one exported there is used instead.
    """
    key = (kind, quantize, id(tmp_path_factory))
    if key not in _EXPORTS:
        name = f"{kind}-{quantize or 'fp32'}"
        out = tmp_path_factory.mktemp(f"backbone-{name}")
        prebuilt = os.environ.get(PREBUILT_ENV)
        if prebuilt:
            src = Path(prebuilt) / name
            if not (src / "manifest.json").exists():
                raise FileNotFoundError(f"{src} holds no exported backbone: run python -m tests.tiny_models {prebuilt}")
            shutil.copytree(src, out, dirs_exist_ok=True)
            manifest = read_manifest(out)
        else:
            from backbone_export import export_backbone

            make = {"llama": make_tiny_llama, "bert": make_tiny_bert}[kind]
            model_dir = make(tmp_path_factory.mktemp(f"tiny-{kind}"))
            manifest = export_backbone(model_dir, out, quantize=quantize, progress=lambda _m: None)
        _EXPORTS[key] = (out, manifest)
    return _EXPORTS[key]


def export_all(target: Path) -> None:
    """Export the fp32 tiny llama and bert into ``target`` (for :data:`PREBUILT_ENV`)."""
    import tempfile

    from backbone_export import export_backbone

    for kind, make in (("llama", make_tiny_llama), ("bert", make_tiny_bert)):
        with tempfile.TemporaryDirectory() as tmp:
            out = target / f"{kind}-fp32"
            shutil.rmtree(out, ignore_errors=True)
            export_backbone(make(Path(tmp) / kind), out, progress=lambda _m: None)
            print(f"exported tiny {kind} to {out}")


if __name__ == "__main__":
    import sys

    export_all(Path(sys.argv[1]))
