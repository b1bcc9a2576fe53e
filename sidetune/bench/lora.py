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
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from sidetune.bench.measure import cpu_seconds, peak_rss_mb

WINDOW = 64  # samples per length-sorted window


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


def lora_child(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(int(cfg.get("seed", 0)))
    with np.load(cfg["inputs"], allow_pickle=False) as z:
        train = ragged(z["train_flat"], z["train_offsets"])
        hold = ragged(z["holdout_flat"], z["holdout_offsets"])
        y_train, y_hold = z["train_labels"], z["holdout_labels"]
    pad, verb = int(cfg["pad_id"]), list(cfg["verbalizer_ids"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32)
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    causal: Any = peft_model.base_model.model
    body = causal.model  # the decoder, LoRA inside its attention
    head = causal.lm_head.weight[verb].detach()  # (C, d): the verbalizer rows only
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(cfg["lr"]))
    batch = int(cfg["batch_size"])
    rng = np.random.default_rng(int(cfg.get("seed", 0)))

    def logits(ids: Any, mask: Any, last: Any) -> Any:
        h = body(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d)
        return h[torch.arange(len(last)), last] @ head.T  # (B, C)

    def evaluate() -> float:
        peft_model.eval()
        order = sorted(range(len(hold)), key=lambda i: len(hold[i]))
        right = 0
        with torch.inference_mode():
            for s in range(0, len(order), 16):
                idx = order[s : s + 16]
                pred = logits(*_batch(hold, idx, pad)).argmax(1).numpy()
                right += int((pred == y_hold[idx]).sum())
        peft_model.train()
        return right / len(hold)

    epochs: list[dict[str, Any]] = []
    eval_cpu = 0.0
    t0 = time.perf_counter()
    best: dict[str, Any] | None = None
    for epoch in range(1, int(cfg["max_epochs"]) + 1):
        peft_model.train()
        perm = rng.permutation(len(train)).tolist()
        batches = []
        for w in range(0, len(perm), WINDOW):
            win = sorted(perm[w : w + WINDOW], key=lambda i: len(train[i]))
            batches += [win[s : s + batch] for s in range(0, len(win), batch)]
        order = rng.permutation(len(batches))
        losses = []
        for n, b in enumerate(order, start=1):
            idx = batches[b]
            loss = torch.nn.functional.cross_entropy(logits(*_batch(train, idx, pad)),
                                                     torch.as_tensor(y_train[idx], dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
            if n % 25 == 0 or n == len(order):
                print(f"lora: epoch {epoch}, batch {n}/{len(order)}, loss {np.mean(losses[-25:]):.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        job_cpu, job_rss = cpu_seconds() - eval_cpu, peak_rss_mb()
        c0 = cpu_seconds()
        acc = evaluate()
        eval_cpu += cpu_seconds() - c0
        row = {"epoch": epoch, "accuracy": acc, "device_cpu_s": job_cpu, "device_peak_rss_mb": job_rss,
               "train_loss": float(np.mean(losses)), "seconds": time.perf_counter() - t0}
        epochs.append(row)
        print(f"lora: epoch {epoch}: held-out accuracy {acc:.4f}, job CPU {job_cpu:.0f} s, "
              f"peak RSS {job_rss:.0f} MB", flush=True)
        if best is not None and acc <= best["accuracy"]:
            break
        best = row
    assert best is not None
    return {"best": best, "epochs": epochs, "trainable_params": sum(p.numel() for p in params)}
