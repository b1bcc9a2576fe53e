"""On-device LoRA, the alternative a board could run instead of sidetune (``sidetune bench compare``).

PEFT LoRA (r = 8, alpha 16, on q_proj and v_proj) on the same backbone in torch, trained on the
board's side with the board's own inputs: the same prompt and token ids as the ONNX forward pass
(``token_ids`` from the compare's forward process), the loss the cross-entropy over the task's
verbalizer logits at the pivot (the last real token), AdamW lr 3e-4, batch 8. Only the verbalizer
rows of the LM head are computed (the rest of the vocabulary does not enter the loss), and each
batch is drawn from a length-sorted window of the shuffled data (little padding): both spare LoRA
work it does not need, so the comparison does not flatter sidetune.

After every epoch the held-out accuracy is scored (its CPU time is not the job's and is taken out);
training stops once an epoch does not improve it, or after ``max_epochs``. The job's figures are
those of the best epoch: CPU seconds from the start of the process (imports and model loading
included, as for the board's forward passes) to the end of that epoch's training, and the peak RSS
by then.

``LoraModel`` is that model and its training and scoring, shared with ``sidetune bench cohort``'s
LoRA baselines (sidetune/bench/flower_lora.py: each board alone, central, and Flower's ClientApp,
which also reads and sets the adapter's tensors alone).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from sidetune.bench.measure import cpu_seconds, peak_rss_mb

WINDOW = 64  # samples per length-sorted window
_STARTED = time.perf_counter()  # when the child imported this (before torch and the model)


def ragged(flat: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    return [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def _batch(seqs: list[list[int]], idx: list[int], pad: int) -> tuple[Any, Any, Any]:
    import torch

    t = max(len(seqs[i]) for i in idx)
    ids = torch.full((len(idx), t), pad, dtype=torch.long)
    mask = torch.zeros((len(idx), t), dtype=torch.long)
    for row, i in enumerate(idx):
        ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
        mask[row, : len(seqs[i])] = 1
    return ids, mask, mask.sum(1) - 1


class LoraModel:
    """The PEFT LoRA model of a board (r = 8, alpha 16, q/v) and what trains and scores it.

    ``logits`` gives the verbalizer logits at the pivot; ``train_epoch`` runs one epoch of
    length-sorted batches; ``evaluate`` scores held-out sequences. ``adapter_state`` and
    ``load_adapter`` read and set the adapter's weights alone (what federated LoRA sends).
    """

    def __init__(self, model_dir: str, verbalizer_ids: list[int], pad_id: int, lr: float) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM")
        self.peft_model = get_peft_model(model, lcfg)
        causal: Any = self.peft_model.base_model.model
        self.body = causal.model  # the decoder, LoRA inside its attention
        self.head = causal.lm_head.weight[list(verbalizer_ids)].detach()  # (C, d): verbalizer rows
        self.params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=float(lr))
        self.pad = int(pad_id)

    def logits(self, ids: Any, mask: Any, last: Any) -> Any:
        import torch

        h = self.body(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d)
        return h[torch.arange(len(last)), last] @ self.head.T  # (B, C)

    def evaluate(self, hold: list[list[int]], y_hold: np.ndarray) -> float:
        import torch

        self.peft_model.eval()
        order = sorted(range(len(hold)), key=lambda i: len(hold[i]))
        right = 0
        with torch.inference_mode():
            for s in range(0, len(order), 16):
                idx = order[s : s + 16]
                pred = self.logits(*_batch(hold, idx, self.pad)).argmax(1).numpy()
                right += int((pred == y_hold[idx]).sum())
        self.peft_model.train()
        return right / len(hold)

    def train_epoch(self, train: list[list[int]], y_train: np.ndarray, batch: int,
                    rng: np.random.Generator,
                    say: Callable[[int, int, float], None]) -> list[float]:
        import torch

        self.peft_model.train()
        perm = rng.permutation(len(train)).tolist()
        batches = []
        for w in range(0, len(perm), WINDOW):
            win = sorted(perm[w : w + WINDOW], key=lambda i: len(train[i]))
            batches += [win[s : s + batch] for s in range(0, len(win), batch)]
        order = rng.permutation(len(batches))
        losses = []
        for n, b in enumerate(order, start=1):
            idx = batches[b]
            out = self.logits(*_batch(train, idx, self.pad))
            loss = torch.nn.functional.cross_entropy(out, torch.as_tensor(y_train[idx],
                                                                          dtype=torch.long))
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            losses.append(float(loss))
            if n % 25 == 0 or n == len(order):
                say(n, len(order), float(np.mean(losses[-25:])))
        return losses

    def adapter_state(self) -> dict[str, Any]:
        """The adapter's tensors alone (PEFT's names, without the adapter's name)."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.peft_model)
        return {k: v.detach().clone() for k, v in state.items()}

    def load_adapter(self, state: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.peft_model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter tensors the model does not have: {unexpected[:3]}")


def lora_child(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(int(cfg.get("seed", 0)))
    with np.load(cfg["inputs"], allow_pickle=False) as z:
        train = ragged(z["train_flat"], z["train_offsets"])
        hold = ragged(z["holdout_flat"], z["holdout_offsets"])
        y_train, y_hold = z["train_labels"], z["holdout_labels"]
    lm = LoraModel(cfg["model_dir"], list(cfg["verbalizer_ids"]), int(cfg["pad_id"]),
                   float(cfg["lr"]))
    params = lm.params
    batch = int(cfg["batch_size"])
    rng = np.random.default_rng(int(cfg.get("seed", 0)))

    epochs: list[dict[str, Any]] = []
    eval_cpu = eval_wall = 0.0
    t0 = time.perf_counter()
    best: dict[str, Any] | None = None
    for epoch in range(1, int(cfg["max_epochs"]) + 1):
        def say(n: int, total: int, loss: float, epoch: int = epoch) -> None:
            print(f"lora: epoch {epoch}, batch {n}/{total}, loss {loss:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

        losses = lm.train_epoch(train, y_train, batch, rng, say)
        job_cpu, job_rss = cpu_seconds() - eval_cpu, peak_rss_mb()
        job_wall = time.perf_counter() - _STARTED - eval_wall
        c0, w0 = cpu_seconds(), time.perf_counter()
        acc = lm.evaluate(hold, y_hold)
        eval_cpu += cpu_seconds() - c0
        eval_wall += time.perf_counter() - w0
        row = {"epoch": epoch, "accuracy": acc, "device_cpu_s": job_cpu,
               "device_peak_rss_mb": job_rss, "train_loss": float(np.mean(losses)),
               "seconds": time.perf_counter() - t0, "job_wall_s": job_wall}
        epochs.append(row)
        print(f"lora: epoch {epoch}: held-out accuracy {acc:.4f}, job CPU {job_cpu:.0f} s, "
              f"peak RSS {job_rss:.0f} MB", flush=True)
        if best is not None and acc <= best["accuracy"]:
            break
        best = row
    assert best is not None
    return {"best": best, "epochs": epochs, "trainable_params": sum(p.numel() for p in params)}
