"""Training the device-defined side network on cached activations.

Loss: ``mean_i ‖g(A_i) − target_i‖²`` with ``target = M·(onehot(y) − p_b)``
(+ noise in the extra dimensions) as the device sent it; the server never
sees labels. A held-out slice of the job's samples gives the validation loss.
Checkpoints (weights + AdamW moments + epoch) are safetensors, never pickle.
Training can pause between any two optimizer steps (fair sharing of a worker,
side_server/worker.py): the checkpoint then also says how far into the next
epoch it got, and a resumed run continues from that step, with the same order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from schemas.schedule import EpochReport, epoch_order, split
from schemas.spec import HyperParams, SideNetSpec
from side_server.sidenet import SideNet


def _optimizer(net: SideNet, hyper: HyperParams) -> torch.optim.AdamW:
    return torch.optim.AdamW(net.parameters(), lr=hyper.lr, weight_decay=hyper.weight_decay)


@dataclass
class Best:
    """The weights of the epoch with the lowest validation loss (the adapter that ships)."""

    val_loss: float
    epoch: int
    weights: dict[str, torch.Tensor]


def checkpoint_bytes(net: SideNet, opt: torch.optim.AdamW, epoch: int, best: Best | None = None,
                     step: int = 0, partial_loss: float = 0.0) -> bytes:
    """``epoch``: the last finished epoch; ``step``: samples of the next one already trained
    (a pause mid-epoch), ``partial_loss`` their summed loss."""
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    names = {id(p): n for n, p in net.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            n = names[id(p)]
            tensors[f"opt.{n}.exp_avg"] = st["exp_avg"].detach().clone()
            tensors[f"opt.{n}.exp_avg_sq"] = st["exp_avg_sq"].detach().clone()
            tensors[f"opt.{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).clone()
    meta = {"epoch": str(epoch), "format": "sidetune-ckpt-v1"}
    if step:
        meta.update(step=str(step), partial_loss=repr(partial_loss))
    if best is not None:
        tensors.update({f"best.{k}": v.clone() for k, v in best.weights.items()})
        meta.update(best_val_loss=repr(best.val_loss), best_epoch=str(best.epoch))
    return bytes(st_save(tensors, metadata=meta))


@dataclass
class Position:
    epoch: int  # the last finished epoch
    best: Best | None
    step: int = 0  # samples of epoch + 1 already trained
    partial_loss: float = 0.0


def restore_checkpoint(blob: bytes, net: SideNet, opt: torch.optim.AdamW) -> Position:
    """Load a checkpoint; returns where training stood (last finished epoch, best weights so far)."""
    n = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8 : 8 + n]).get("__metadata__", {})
    tensors = st_load(blob)
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for name, p in net.named_parameters():
        if f"opt.{name}.exp_avg" in tensors:
            opt.state[p] = {
                "step": tensors[f"opt.{name}.step"].reshape(()).clone(),
                "exp_avg": tensors[f"opt.{name}.exp_avg"].clone(),
                "exp_avg_sq": tensors[f"opt.{name}.exp_avg_sq"].clone(),
            }
    best = None
    if "best_val_loss" in meta:
        best = Best(float(meta["best_val_loss"]), int(meta["best_epoch"]),
                    {k[5:]: v for k, v in tensors.items() if k.startswith("best.")})
    return Position(int(meta.get("epoch", 0)), best, int(meta.get("step", 0)), float(meta.get("partial_loss", 0.0)))


def train(
    spec: SideNetSpec,
    hyper: HyperParams,
    states: np.ndarray,  # (N, T, d): tapped states only
    targets: np.ndarray,  # (N, K)
    *,
    init_weights: bytes | None = None,
    checkpoint: bytes | None = None,
    on_epoch: Callable[[EpochReport, bytes], bool] | None = None,
    should_pause: Callable[[], bool] | None = None,
    on_pause: Callable[[bytes], None] | None = None,
    sample_weight: np.ndarray | None = None,  # (N,), mean 1: a cohort's capped member shares
) -> tuple[SideNet, list[EpochReport]]:
    """Train for the remaining epochs. ``on_epoch(report, checkpoint)`` returns False to stop.
    ``should_pause()`` is asked after every optimizer step within an epoch; when it says yes,
    ``on_pause(checkpoint)`` gets a checkpoint of that point and training stops.

    With a validation slice, the returned network holds the weights of the
    epoch with the lowest validation loss (a cheap guard against the
    overfitting DESIGN.md warns of); without one, the last epoch's.
    """
    torch.manual_seed(hyper.seed)
    net = SideNet(spec)
    if init_weights is not None:
        net.load_weights(init_weights)
    opt = _optimizer(net, hyper)
    pos = restore_checkpoint(checkpoint, net, opt) if checkpoint else Position(0, None)
    best = pos.best

    x = torch.from_numpy(np.ascontiguousarray(states, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
    sw = None if sample_weight is None else torch.from_numpy(np.ascontiguousarray(sample_weight, dtype=np.float32))

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        per = ((net.forward_tapped(x[idx]) - y[idx]) ** 2).sum(dim=1)  # (B, K) -> (B,)
        return (per if sw is None else per * sw[idx]).mean()

    tr, va = split(len(x), hyper)
    reports: list[EpochReport] = []
    finished = True
    for epoch in range(pos.epoch + 1, hyper.epochs + 1):
        t0 = time.perf_counter()
        net.train()
        order = epoch_order(tr, hyper, epoch)
        first, total = (pos.step, pos.partial_loss) if epoch == pos.epoch + 1 else (0, 0.0)
        paused = False
        for b in range(first, len(order), hyper.batch_size):
            idx = torch.from_numpy(order[b : b + hyper.batch_size])
            loss = loss_of(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            done = b + hyper.batch_size
            if done < len(order) and should_pause is not None and should_pause():
                if on_pause is not None:
                    on_pause(checkpoint_bytes(net, opt, epoch - 1, best, step=done, partial_loss=total))
                paused = True
                break
        if paused:
            finished = False
            break
        train_loss = total / max(len(order), 1)
        val_loss = None
        if len(va):
            net.eval()
            with torch.no_grad():
                vi = torch.from_numpy(va)
                val_loss = float(loss_of(vi))
            if best is None or val_loss < best.val_loss:
                best = Best(val_loss, epoch, {k: v.detach().clone() for k, v in net.state_dict().items()})
        report = EpochReport(epoch, train_loss, val_loss, time.perf_counter() - t0)
        reports.append(report)
        if on_epoch is not None and not on_epoch(report, checkpoint_bytes(net, opt, epoch, best)):
            finished = epoch == hyper.epochs
            break
    if best is not None and finished:
        net.load_state_dict(best.weights)
    return net, reports
