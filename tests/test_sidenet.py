"""The side network, defined once: torch (server) and numpy (board) agree; training resumes exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_agent.config import EdgeSettings
from edge_agent.secret import DeviceSecret
from schemas import HyperParams, SideNetSpec, WeightsError, decode_weights, expected_shapes
from schemas.schedule import EpochReport
from schemas.sidenet import SideNetForward
from side_server.sidenet import SideNet
from side_server.trainer import train


def _random_net(spec: SideNetSpec, seed: int = 0) -> SideNet:
    torch.manual_seed(seed)
    net = SideNet(spec)
    for p in net.parameters():  # non-zero everywhere, so every path is exercised
        torch.nn.init.normal_(p, 0.0, 0.3)
    return net


@pytest.mark.parametrize("activation", ["gelu", "relu", "tanh"])
@pytest.mark.parametrize("norm", ["layernorm", "none"])
@pytest.mark.parametrize("taps", [(3,), (1, 4, 6), (0, 2, 3, 5, 6)])
def test_numpy_forward_matches_torch(activation, norm, taps):
    spec = SideNetSpec(num_states=7, width=24, taps=taps, bottleneck=5, out_dim=6, norm=norm, activation=activation)
    net = _random_net(spec)
    states = np.random.default_rng(1).normal(0, 8, size=(11, 7, 24)).astype(np.float32)  # outliers, as LLMs have
    with torch.no_grad():
        want = net(torch.from_numpy(states)).numpy()
    got = SideNetForward.from_bytes(spec, net.to_weights())(states)
    assert got.shape == (11, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_fresh_network_leaves_the_backbone_prediction_unchanged():
    spec = SideNetSpec(num_states=5, width=16, taps=(2, 4), out_dim=4)
    states = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32)
    with torch.no_grad():
        assert torch.count_nonzero(SideNet(spec)(torch.from_numpy(states))) == 0
    gates = SideNet(spec).gates()
    assert gates == [0.5]  # μ = sigmoid(0) for the second tap; the first has no gate


def test_weights_carry_exactly_the_spec_names_and_shapes():
    spec = SideNetSpec(num_states=5, width=16, taps=(2, 4), bottleneck=3, out_dim=4)
    tensors = decode_weights(_random_net(spec).to_weights(), spec)
    assert {k: v.shape for k, v in tensors.items()} == expected_shapes(spec)
    other = spec.model_copy(update={"bottleneck": 4})
    with pytest.raises(WeightsError, match="shape"):
        decode_weights(_random_net(spec).to_weights(), other)


def test_training_resumed_from_a_checkpoint_ends_where_uninterrupted_training_does():
    spec = SideNetSpec(num_states=4, width=16, taps=(1, 3), bottleneck=4, out_dim=3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2, 16)).astype(np.float32)
    y = np.tanh(x[:, 1] @ rng.normal(size=(16, 3))).astype(np.float32)
    hyper = HyperParams(epochs=6, lr=1e-2, batch_size=32)
    checkpoints: list[bytes] = []

    def keep(report: EpochReport, blob: bytes) -> bool:
        checkpoints.append(blob)
        return True

    full, reports = train(spec, hyper, x, y, on_epoch=keep)
    assert [r.epoch for r in reports] == list(range(1, 7))
    assert reports[-1].train_loss < reports[0].train_loss
    resumed, later = train(spec, hyper, x, y, checkpoint=checkpoints[2])
    assert [r.epoch for r in later] == [4, 5, 6]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_the_shipped_weights_are_those_of_the_best_validation_epoch():
    spec = SideNetSpec(num_states=4, width=16, taps=(1, 3), bottleneck=4, out_dim=3)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 2, 16)).astype(np.float32)
    y = rng.normal(size=(100, 3)).astype(np.float32)  # noise: validation loss rises as it overfits
    snapshots: list[dict[str, torch.Tensor]] = []
    net, reports = train(spec, HyperParams(epochs=15, lr=3e-2, batch_size=10, val_fraction=0.3), x, y,
                         on_epoch=lambda r, blob: snapshots.append(_model_of(blob)) or True)
    best = min(range(len(reports)), key=lambda i: reports[i].val_loss or 0.0)
    assert best < len(reports) - 1, "the test needs a run whose last epoch is not its best"
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, snapshots[best][name], msg=name)


def _model_of(blob: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return {k[6:]: v for k, v in load(blob).items() if k.startswith("model.")}


def test_mixed_targets_unmix_to_the_residual_and_hide_the_plain_one():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    secret = DeviceSecret(b"k" * 32, q)
    prior = rng.dirichlet([1, 1], size=50).astype(np.float32)
    labels = rng.integers(0, 2, size=50)
    targets = secret.targets(labels, prior, noise_std=0.25, rng=rng)
    residual = np.eye(2)[labels] - prior
    assert targets.shape == (50, 8)
    np.testing.assert_allclose(secret.unmix(targets, 2), residual, atol=1e-5)  # the noise sits in the other 6 dims
    assert not np.allclose(targets[:, :2], residual, atol=1e-2)  # what travels is not the plain residual


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_what_mixing_does_not_hide_the_class_partition_and_count(classes):
    """The limits the README states, checked: with the default noise, C − 1 principal components of the
    mixed targets stand far out of the noise floor, and the first one splits the samples by class."""
    rng = np.random.default_rng(classes)
    n = 2000
    secret = DeviceSecret.generate(8, rng)
    labels = rng.integers(0, classes, n)
    prior = rng.dirichlet(np.ones(classes), size=n) * 0.5 + np.eye(classes)[labels] * 0.2 + 0.3 / classes
    targets = secret.targets(labels, prior, EdgeSettings.model_fields["noise_std"].default, rng)
    eig, vec = np.linalg.eigh(np.cov(targets.T))
    eig = eig[::-1]
    floor = np.median(eig[classes:])
    assert (eig > 5 * floor).sum() == classes - 1
    pc = (targets - targets.mean(0)) @ vec[:, -1]
    if classes == 2:  # one component: its sign is the class
        assert max(np.mean((pc > 0) == (labels == k)) for k in range(2)) > 0.95
