"""The board's own model: task, frozen backbone, device secret, side-network spec, installed adapter.

This is all that prediction needs (``sidetune edge predict`` builds only this,
no ledger, no broker); the daemon builds it once and trains it in rounds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edge_agent import adapter as adapters
from edge_agent.backbone import Backbone
from edge_agent.calibration import calibrate, fit_prior_bias, load_bias, save_bias
from edge_agent.config import EdgeSettings
from edge_agent.evaluate import as_probabilities, probabilities
from edge_agent.features import FeatureExtractor, default_taps
from edge_agent.secret import DeviceSecret, load_or_create, with_cohort_basis
from edge_agent.task import TaskSpec
from schemas.adapter import AdapterUpdate
from schemas.errors import ConfigurationError, SpecMismatch
from schemas.files import private_dir
from schemas.spec import SideNetSpec

log = logging.getLogger("sidetune.edge")


class LocalModel:
    def __init__(self, settings: EdgeSettings) -> None:
        self.state_dir = private_dir(Path(settings.state_dir))
        self.task = TaskSpec.from_toml(settings.task_file)
        if settings.out_dim <= self.task.num_classes:
            raise ConfigurationError(f"out_dim ({settings.out_dim}) must exceed the number of classes "
                                     f"({self.task.num_classes}) so the mixing can hide them")
        self.backbone = Backbone.load(settings.backbone_dir, threads=settings.threads)
        self.fx = FeatureExtractor(self.backbone, self.task, settings.max_length, settings.batch_size)
        try:
            self.secret: DeviceSecret = load_or_create(self.state_dir, settings.out_dim)
            if settings.cohort is not None:
                if settings.cohort_secret_file is None:
                    raise ValueError(f"cohort = {settings.cohort!r} needs cohort_secret_file (the cohort's secret, "
                                     f"made with `sidetune cohort secret {settings.cohort}` and installed beside "
                                     "the board's bundle)")
                self.secret = with_cohort_basis(self.secret, settings.cohort_secret_file, settings.cohort,
                                                settings.out_dim)
        except ValueError as e:
            raise ConfigurationError(str(e)) from None
        taps = tuple(settings.taps) if settings.taps else tuple(default_taps(self.backbone.num_layers))
        self.spec = SideNetSpec(num_states=self.backbone.num_layers + 1, width=self.backbone.hidden_size, taps=taps,
                                bottleneck=settings.bottleneck, out_dim=settings.out_dim,
                                states=settings.wire_states)
        self.adapter: adapters.InstalledAdapter | None = None
        try:
            self.adapter = adapters.load(self.state_dir, self.spec, self.backbone.fingerprint)
        except SpecMismatch as e:
            log.warning("%s; predicting with the backbone alone until a new adapter arrives", e)
        try:
            self.prior_bias: np.ndarray | None = load_bias(self.state_dir, self.task.num_classes)
        except ValueError as e:
            raise ConfigurationError(str(e)) from None

    @property
    def adapter_version(self) -> int:
        return self.adapter.version if self.adapter else 0

    def install(self, update: AdapterUpdate) -> None:
        """Check an adapter against this board's spec and backbone, then swap it in atomically."""
        adapters.check_update(update, self.spec, self.backbone.fingerprint)
        adapters.install(self.state_dir, update)
        self.adapter = adapters.load(self.state_dir, self.spec, self.backbone.fingerprint)

    def calibrated(self, prior: np.ndarray) -> np.ndarray:
        """The prior targets are formed against and adapters added to (edge_agent/calibration.py)."""
        return calibrate(prior, self.prior_bias).astype(np.float32)

    def fit_calibration(self, prior: np.ndarray) -> None:
        """Fit the board's prior bias on its training samples' priors, once (the first round)."""
        if self.prior_bias is None:
            self.prior_bias = fit_prior_bias(prior)
            save_bias(self.state_dir, self.prior_bias, len(prior))
            log.info("calibrated the prior on %d samples: bias %s", len(prior),
                     " ".join(f"{x:+.3f}" for x in self.prior_bias))

    def predict(self, texts: list[str]) -> np.ndarray:
        """Class probabilities (N, C): ``argmax(p_cal + Mᵀ·g(A))`` made a distribution (``p_b`` alone
        before any adapter)."""
        f = self.fx.extract(texts)
        prior = f.prior if self.adapter is None else self.calibrated(f.prior)
        return as_probabilities(probabilities(prior, f.states, self.adapter, self.secret))
