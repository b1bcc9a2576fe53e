"""The nn.Module that is exported: hidden states (and LM logits) at the pivot token.

``PivotWrapper(model, kind)(input_ids, attention_mask)`` returns

* ``pivot_states``: float32 ``[batch, num_layers + 1, hidden]`` -- the
  embedding output and every layer's output (``output_hidden_states``; the last
  one after the final norm) at the pivot token;
* ``pivot_logits``: float32 ``[batch, vocab]`` -- the LM head at the pivot
  (causal models only).

Pivot: causal -> the last real token (last 1 in the mask); encoder -> the
first real token. Position ids are derived from the mask, so left or right
padding gives the states of the unpadded sequence.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .load import CAUSAL


def _gather(h: torch.Tensor, idx: torch.Tensor, width: int) -> torch.Tensor:
    """h [B, T, d], idx [B] -> [B, d] (d a Python int: static in the graph)."""
    index = idx.view(-1, 1, 1).repeat(1, 1, width)  # Tile: keeps d static for shape inference
    return torch.gather(h, 1, index).squeeze(1)


class PivotWrapper(nn.Module):
    def __init__(self, model: Any, kind: str):
        super().__init__()
        self.kind = kind
        self.width = int(model.config.hidden_size)
        self.model = model
        if kind == CAUSAL:
            self.body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
            self.head = model.get_output_embeddings()
        else:
            self.body = model
            self.head = None
        params = inspect.signature(self.body.forward).parameters
        self._takes_positions = "position_ids" in params
        self._takes_token_types = "token_type_ids" in params
        emb = getattr(self.body, "embeddings", None)
        # RoBERTa-style embeddings count positions from padding_idx + 1.
        self._position_offset = None
        if kind != CAUSAL and emb is not None and getattr(emb, "padding_idx", None) is not None:
            self._position_offset = int(emb.padding_idx)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        mask = attention_mask.to(torch.int64)
        counts = torch.cumsum(mask, dim=1)
        ones = torch.ones_like(mask)
        positions = torch.cumsum(ones, dim=1) - 1  # 0..T-1 per row
        kwargs: dict[str, Any] = {}
        if self._takes_positions:
            if self._position_offset is not None:
                kwargs["position_ids"] = counts * mask + self._position_offset
            else:
                kwargs["position_ids"] = torch.clamp(counts - 1, min=0)
        if self._takes_token_types:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        if self.kind == CAUSAL:
            kwargs["use_cache"] = False
            pivot = torch.max(positions * mask, dim=1).values  # last real token
        else:
            length = torch.sum(ones, dim=1, keepdim=True)  # T, as a tensor (stays dynamic)
            first = torch.min(positions + (1 - mask) * length, dim=1).values  # first real token
            pivot = torch.remainder(first, length.squeeze(1))  # an all-padding row -> 0
        out = self.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            return_dict=True,
            **kwargs,
        )
        hidden = out.hidden_states
        states = torch.stack([_gather(h, pivot, self.width) for h in hidden], dim=1)
        states = states.reshape(-1, len(hidden), self.width)  # static [L+1, d] in the graph
        if self.head is None:
            return states
        return states, self._logits(_gather(out.last_hidden_state, pivot, self.width))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        head = self.head
        if isinstance(head, nn.Linear):
            # W [V, d] @ h^T [d, B] uses the weight as stored: a tied head shares
            # the embedding initializer instead of a transposed copy (-V*d floats).
            logits = torch.matmul(head.weight, h.transpose(0, 1)).transpose(0, 1)
            return logits + head.bias if head.bias is not None else logits
        return head(h)
