"""Load a located model (HF directory or GGUF) with transformers, in fp32, eval mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ExportError
from .locate import ModelSource

CAUSAL = "causal"
ENCODER = "encoder"


@dataclass
class LoadedModel:
    source: ModelSource
    model: Any  # torch.nn.Module: *ForCausalLM (causal) or the bare encoder (AutoModel)
    tokenizer: Any  # a transformers fast tokenizer
    kind: str  # CAUSAL or ENCODER
    config: Any

    @property
    def pivot(self) -> str:
        return "last" if self.kind == CAUSAL else "first"


def _gguf_kwargs(source: ModelSource) -> dict[str, Any]:
    return {"gguf_file": source.gguf_file} if source.kind == "gguf" else {}


def classify_config(config: Any) -> str:
    """CAUSAL or ENCODER for a transformers config, else raise ExportError."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None) or "?"
    archs = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        raise ExportError(
            f"unsupported architecture: {model_type} ({', '.join(archs) or 'no architectures'}) "
            "is an encoder-decoder model; export a causal language model or an encoder"
        )
    encoder_type = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    causal_arch = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if causal_arch and (not encoder_type or getattr(config, "is_decoder", False)):
        return CAUSAL
    if encoder_type:
        return ENCODER
    if not archs and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return CAUSAL
    raise ExportError(
        f"unsupported architecture: {model_type} ({', '.join(archs) or 'no architectures'}) "
        "is neither a causal language model nor a text encoder"
    )


def load_config(source: ModelSource) -> tuple[Any, str]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(source.directory), **_gguf_kwargs(source))
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise ExportError(f"cannot read the model configuration of {source.spec!r}: {e}") from e
    return config, classify_config(config)


def load_model(source: ModelSource, attn_implementation: str | None = "eager") -> LoadedModel:
    """Model (fp32, eval) + fast tokenizer; raises ExportError on any load failure."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    config, kind = load_config(source)
    kwargs: dict[str, Any] = dict(_gguf_kwargs(source), dtype=torch.float32)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    cls = AutoModelForCausalLM if kind == CAUSAL else AutoModel
    try:
        model = cls.from_pretrained(str(source.directory), **kwargs)
    except (ValueError, KeyError, OSError, RuntimeError, ImportError) as e:
        raise ExportError(f"cannot load model {source.spec!r}: {e}") from e
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.directory), **_gguf_kwargs(source))
    except (ValueError, KeyError, OSError, RuntimeError, ImportError) as e:
        raise ExportError(f"cannot load the tokenizer of {source.spec!r}: {e}") from e
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ExportError(
            f"the tokenizer of {source.spec!r} is not a fast (tokenizers) tokenizer; "
            "the edge runtime needs a tokenizer.json"
        )
    if kind == CAUSAL and model.get_output_embeddings() is None:
        raise ExportError(f"causal model {source.spec!r} has no LM head")
    return LoadedModel(
        source=source, model=model, tokenizer=tokenizer, kind=kind, config=model.config
    )
