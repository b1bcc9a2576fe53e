"""The board trainer (numpy, schemas/sidenet.py) against the server's torch trainer.

Not edge-marked: it needs torch (the server's side network and trainer).
"""

from __future__ import annotations

import numpy as np
import pytest

from schemas import sidenet as bt
from schemas.spec import HyperParams, SideNetSpec
from schemas.weights import decode_weights, encode_weights


def _random_weights(spec: SideNetSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from schemas.weights import expected_shapes

    return {k: rng.normal(0.0, 0.3, size=shape) for k, shape in expected_shapes(spec).items()}


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu", "tanh"])
@pytest.mark.parametrize("norm", ["layernorm", "none"])
def test_numpy_gradients_equal_torch_autograd(activation, norm, weighted):
    import torch

    from side_server.sidenet import SideNet

    spec = SideNetSpec(num_states=6, width=12, taps=(1, 3, 5), bottleneck=4, out_dim=5, norm=norm,
                       activation=activation)
    rng = np.random.default_rng(7)
    w = _random_weights(spec, rng)  # float64, every parameter non-zero so every path carries gradient
    tapped = rng.normal(size=(9, len(spec.taps), spec.width))
    y = rng.normal(size=(9, spec.out_dim))
    sw = rng.uniform(0.2, 2.0, size=9) if weighted else None  # a cohort's capped member shares

    net = SideNet(spec).double()
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in w.items()})
    per = ((net.forward_tapped(torch.from_numpy(tapped)) - torch.from_numpy(y)) ** 2).sum(dim=1)
    loss_t = (per * torch.from_numpy(sw) if weighted else per).mean()
    loss_t.backward()
    want = {k: p.grad.numpy() for k, p in net.named_parameters()}

    loss, got = bt.loss_and_grads(spec, w, bt.normalise_inputs(spec, tapped, np.float64), y, sw)
    assert loss == pytest.approx(float(loss_t.detach()), rel=1e-12)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("weighted", [False, True])
def test_a_training_run_matches_the_server_trainer(weighted):
    """Same initial weights, same data: AdamW, batch order, split and best-epoch choice give the same adapter."""
    from side_server.trainer import train as torch_train

    spec = SideNetSpec(num_states=5, width=16, taps=(1, 2, 4), bottleneck=4, out_dim=4)
    hyper = HyperParams(epochs=6, lr=3e-3, batch_size=16, val_fraction=0.2, seed=3)
    rng = np.random.default_rng(1)
    tapped = rng.normal(size=(120, 3, 16)).astype(np.float32)
    targets = (tapped[:, -1, :4] * 0.5 + rng.normal(0, 0.1, size=(120, 4))).astype(np.float32)
    init = encode_weights({k: v * 0.5 for k, v in _random_weights(spec, rng).items()}, spec)

    sw = rng.uniform(0.2, 2.0, size=120).astype(np.float32) if weighted else None

    net, reports_t = torch_train(spec, hyper, tapped, targets, init_weights=init, sample_weight=sw)
    blob, reports_b = bt.train(spec, hyper, tapped, targets, init=init, sample_weight=sw)
    for rt, rb in zip(reports_t, reports_b, strict=True):
        assert rb.train_loss == pytest.approx(rt.train_loss, rel=1e-4)
        assert rb.val_loss == pytest.approx(rt.val_loss, rel=1e-4)
    ours = decode_weights(blob, spec)
    for k, v in net.state_dict().items():
        np.testing.assert_allclose(ours[k], v.numpy(), rtol=1e-3, atol=1e-5, err_msg=k)
