"""The edge agent's settings (TOML file, then SIDETUNE_EDGE_* environment)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from schemas.settings import FileThenEnv, read_secret
from schemas.spec import HyperParams
from schemas.topics import check_device_id


class EdgeSettings(FileThenEnv):
    model_config = SettingsConfigDict(env_prefix="SIDETUNE_EDGE_", env_nested_delimiter="__", extra="forbid")

    device_id: str
    #: The device's MQTT password (its user name is its device id): systemd's credential
    #: ``broker-password`` (``LoadCredential=``) when the unit gives one, else ``password_file``
    #: (0600, written by `sidetune broker add-device`), else ``password`` itself.
    password_file: Path | None = None
    password: str = ""
    broker_host: str = "127.0.0.1"
    broker_port: int = Field(default=1883, gt=0, lt=65536)
    broker_ca_file: str | None = None
    #: Holds the secret, the ledger (SQLite), the outbox, the adapter and the inbox.
    state_dir: Path
    backbone_dir: Path
    task_file: Path
    threads: int = Field(default=2, ge=1, le=64)
    max_length: int = Field(default=128, ge=8, le=4096)
    batch_size: int = Field(default=8, ge=1, le=256)
    #: A round starts once this many new samples wait (or on `sidetune edge train`).
    min_new_samples: int = Field(default=200, ge=1)
    #: Samples per activations message (fp16 SmolLM2: 35.7 KB each).
    upload_batch: int = Field(default=64, ge=1, le=1024)
    wire_dtype: str = Field(default="float16", pattern="^(float16|int8|float32)$")
    #: Pivot states sent per sample: ``"taps"`` only the rows the side network reads (SmolLM2, default taps: 10
    #: of 31 rows, 11.7 KB a sample up in fp16 instead of 35.9 KB; the server trains the same network on the same
    #: rows), ``"all"`` every layer's (what boards sent before; a changed setting gives new sample keys).
    wire_states: Literal["all", "taps"] = "taps"
    #: Side network the device asks for.
    bottleneck: int = Field(default=8, ge=1, le=1024)
    out_dim: int = Field(default=8, ge=2, le=256, description="K, the width of the mixed targets")
    taps: list[int] | None = None
    #: Noise in the K−C extra target dimensions. `sidetune bench accuracy --noise X` on the demo's task:
    #: 0 → 0.836, 0.1 → 0.827, 0.25 → 0.812 held-out accuracy (labels in the clear: 0.831). No level that
    #: keeps the accuracy hides the class count: one strong principal component per class but one shows.
    noise_std: float = Field(default=0.1, ge=0.0, le=10.0)
    #: Label differential privacy: ε of the randomised response applied to each sample's label before its
    #: residual is formed (edge_agent/label_dp.py). Each sample's reported label is drawn once, kept in the
    #: ledger and resent unchanged in every later round; a changed ε applies to samples not yet drawn.
    #: The true label is kept with probability e^ε/(e^ε + C − 1), C classes:
    #:   ε \ C   2      5      7      10
    #:   1      0.731  0.405  0.312  0.232
    #:   2      0.881  0.649  0.552  0.451
    #:   4      0.982  0.932  0.901  0.858
    #: Measured cost at ε = 2 (server training): 0.8 point on Rotten Tomatoes (2 classes, bench privacy),
    #: 14 points on the 7-class news task (bench compare). ``inf`` turns it off. It applies only to what
    #: goes to the server: a board that trains itself or a federated cohort member sends no label.
    label_epsilon: float = Field(default=2.0, gt=0.0)
    #: Who trains a lone board's side network (a cohort member's is its ``pool``'s): ``"board"`` (the
    #: default: schemas/sidenet.py, the server's network, optimiser, schedule and best epoch, in numpy on
    #: the board's own cached features and TRUE labels; no job, no target and no activation leaves the
    #: board, only its status) or ``"server"`` (the board uploads label-DP targets and pivot states).
    #: Chosen by measurement: on Rotten Tomatoes board training gave 0.849 against 0.841 for the server
    #: at ε = 2, for 179 against 177 board CPU-s (`sidetune bench privacy`); on the 7-class news task
    #: the server at ε = 2 reached 0.406 where the same network on true labels reached 0.547 (`sidetune
    #: bench compare`): label-DP costs a lone board more the more classes it has, board training
    #: nothing. The server is for pooling a cohort. A board-trained board keeps its samples' states.
    train_on: Literal["server", "board"] = "board"
    #: The cohort this board belongs to (`sidetune broker add-device --cohort`): boards of one task that
    #: train one side network together. Its targets are mixed with the cohort's shared secret
    #: (``cohort_secret_file``, made off the server by `sidetune cohort secret`) instead of the board's
    #: own, so the server can pool them with the other members' (it checks membership itself).
    cohort: str | None = None
    cohort_secret_file: Path | None = None
    #: How a cohort member pools: ``"activations"`` (the server trains on the members' cached pivot
    #: states and label-DP targets, as a lone board's do) or ``"weights"`` (federated: the board trains
    #: the cohort's network on its own states and clean labels and sends only the change of its
    #: weights; the server averages the members' changes; nothing per sample leaves the board).
    pool: Literal["activations", "weights"] = "weights"
    #: FedAvg rounds per agent round of a federated member: after the cohort's average arrives, the
    #: board trains again from it on its cached states (no forward pass) and sends another update,
    #: this many times in all, then installs the last average and evaluates it. Measured on the news
    #: task over 8 boards (`sidetune bench cohort`'s shards, IID): 1 round 0.552, 3 rounds 0.594,
    #: 6 rounds 0.616 held-out accuracy; each round costs the board about 0.25 CPU-s of training and
    #: one update up and one adapter down (415 KB each with SmolLM2's side network).
    federated_rounds: int = Field(default=3, ge=1, le=100)
    hyper: HyperParams = HyperParams()
    #: Optional held-out JSONL ({"text", "label"}) to evaluate each new adapter on.
    holdout_file: Path | None = None
    #: A round that hears nothing from the server for this long sends its job again (the
    #: server answers with what it still lacks). This also recovers uplinks mosquitto drops
    #: in the second between its restart and the workers' re-subscription.
    round_timeout: float = Field(default=120.0, gt=0)
    log_level: str = "INFO"
    #: ``text`` (journald-friendly lines) or ``json`` (one object per line: time, level, logger,
    #: message, device, job).
    log_format: Literal["text", "json"] = "text"
    #: The agent's metrics are written to ``<state_dir>/metrics.prom`` (node_exporter's textfile
    #: format) whatever this says; a port other than 0 also serves them on 127.0.0.1 (``/metrics``).
    metrics_port: int = Field(default=0, ge=0, lt=65536)

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        check_device_id(v)
        return v

    @field_validator("cohort")
    @classmethod
    def _cohort(cls, v: str | None) -> str | None:
        if v is not None:
            check_device_id(v)  # a cohort name has a device id's charset
        return v

    def broker_password(self) -> str:
        return read_secret(f"device {self.device_id}", self.password, self.password_file, "broker-password")
