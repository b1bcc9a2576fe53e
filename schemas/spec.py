"""The side network a device asks for, and the hyper-parameters of a job.

The server builds exactly this network (side_server/sidenet.py) and the board
runs it in numpy (schemas/sidenet.py); both read this spec only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: sha256 hex of backbone.onnx (the `Fingerprint` type in schemas.base checks it)
FINGERPRINT_PATTERN = r"^[0-9a-f]{64}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SideNetSpec(_Frozen):
    """Additive ladder side network (DESIGN.md §2.4).

    ``taps`` index the backbone's pivot states (0 = embedding output,
    ``num_layers`` = last layer); ``width`` is the backbone's hidden size d;
    ``out_dim`` is K, the width of the mixed target.
    """

    num_states: int = Field(ge=1, le=1024, description="L+1 pivot states per sample on the wire")
    width: int = Field(ge=1, le=16384, description="hidden size d")
    taps: tuple[int, ...] = Field(min_length=1, max_length=256)
    bottleneck: int = Field(default=8, ge=1, le=1024)
    out_dim: int = Field(ge=2, le=256)
    norm: Literal["layernorm", "none"] = "layernorm"
    activation: Literal["gelu", "relu", "tanh"] = "gelu"
    #: Which pivot states the board sends: ``"all"`` L+1 rows per sample (embedding and every layer), or
    #: ``"taps"`` only the tapped rows the side network reads (SmolLM2, default taps: 10 of 31, a third of
    #: the bytes; the network trained is the same). See ``wire_rows`` and ``tap_rows``.
    states: Literal["all", "taps"] = "all"

    @field_validator("taps")
    @classmethod
    def _taps_sorted(cls, taps: tuple[int, ...]) -> tuple[int, ...]:
        if list(taps) != sorted(set(taps)):
            raise ValueError("taps must be strictly increasing")
        if taps[0] < 0:
            raise ValueError("taps must be non-negative")
        return taps

    @model_validator(mode="after")
    def _taps_in_range(self) -> SideNetSpec:
        if self.taps[-1] >= self.num_states:
            raise ValueError(f"tap {self.taps[-1]} is out of range for {self.num_states} pivot states")
        return self

    @property
    def wire_rows(self) -> tuple[int, ...]:
        """Indices (into the L+1 pivot states) of the rows an activation batch carries per sample."""
        return self.taps if self.states == "taps" else tuple(range(self.num_states))

    @property
    def tap_rows(self) -> tuple[int, ...]:
        """Where the taps sit among the rows that travel (what the server's cache hands the trainer)."""
        return tuple(range(len(self.taps))) if self.states == "taps" else self.taps

    def key_scope(self, pivot: str) -> str:
        """The pivot rule as the sample key binds it (edge_agent/keys.py): with ``states = "taps"`` it
        also names the rows sent, so a cached sample is never read back under another set of rows."""
        if self.states == "all":
            return pivot
        return f"{pivot}/rows=" + ",".join(str(t) for t in self.taps)


class HyperParams(_Frozen):
    """Training settings of a job.

    Defaults: the prototype's AdamW at lr 1e-3 for 10 epochs gave 0.79–0.82
    held-out accuracy across seeds on SmolLM2 + Rotten Tomatoes (1,600
    samples, 500 held out); lr 5e-4 for 20 epochs, keeping the epoch with the
    lowest validation loss, gave 0.80–0.81: the same mean, half the spread.
    """

    epochs: int = Field(default=20, ge=1, le=1000)
    lr: float = Field(default=5e-4, gt=0, le=1.0)
    weight_decay: float = Field(default=0.01, ge=0, le=10.0)
    batch_size: int = Field(default=64, ge=1, le=8192)
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
