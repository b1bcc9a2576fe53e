"""Federated LoRA with Flower for ``sidetune bench cohort``: the code the Flower app runs.

``sidetune/bench/flower_app`` is the Flower app (its pyproject names the components); its two
modules only call :func:`client_train` (the ClientApp's train handler, in the process Flower starts
on the board for each message) and :func:`server_main` (the ServerApp).

* The **ClientApp** takes one of ``SLOTS`` training slots (a ``flock`` on a file the boards share:
  at most two clients train at a time on this 2-core machine; waiting costs no CPU), loads the
  backbone with the PEFT LoRA adapter of ``sidetune/bench/lora.py`` (r = 8, q/v), sets the
  adapter to the global one it received, trains ``local-epochs`` over its partition (the board's
  token ids and labels, from ``--node-config``) exactly as on-device LoRA trains, and replies
  with the adapter and its own cost: CPU seconds of its process (``getrusage``) and its peak RSS
  (``VmHWM``) when it is done.
* The **ServerApp** runs Flower's ``FedAvg`` (weighted by samples, every board every round, no
  federated evaluation), starting from the adapter PEFT initialises (the same seed as on-device
  LoRA), and keeps, per round and board, the bytes of every message it sends and receives: the
  sum of the serialized objects of the message (Flower sends a message as a tree of content-
  addressed objects; a shared object is counted once per message). After each round it saves the
  global adapter (``adapter-round-R.safetensors``) and appends the round to ``rounds.jsonl``.

Two children of the bench itself live here too (run by ``sidetune/bench/measure.py``):
``score_child`` scores saved adapters on the held-out set, ``adapter_size_child`` writes a fresh
adapter to count its bytes.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sidetune.bench.measure import cpu_seconds, peak_rss_mb

SLOTS = 2


def message_bytes(message: Any) -> int:
    """Bytes of a Flower message as it travels: its serialized objects, each counted once."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def _take_slot(slots_dir: Path) -> tuple[Any, float]:
    """An open, exclusively locked slot file (close it to free the slot) and the seconds waited."""
    slots_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    while True:
        for i in range(SLOTS):
            f = open(slots_dir / f"slot-{i}", "a")  # noqa: SIM115 - held until the slot is freed
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return f, time.perf_counter() - t0
            except BlockingIOError:
                f.close()
        time.sleep(0.2)


def _verbalizers(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",")]


def client_train(msg: Any, context: Any) -> Any:
    """The ClientApp's train handler: local LoRA epochs from the global adapter."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from sidetune.bench.lora import LoraModel, ragged

    node, run = context.node_config, context.run_config
    board, rnd = int(node["board"]), int(msg.content["config"]["server-round"])
    slot, waited = _take_slot(Path(str(node["slots"])))
    try:
        import torch

        torch.set_num_threads(int(run["threads"]))
        seed = int(run["seed"])
        torch.manual_seed(seed)
        with np.load(str(node["partition"]), allow_pickle=False) as z:
            train = ragged(z["train_flat"], z["train_offsets"])
            labels = z["train_labels"]
        lm = LoraModel(
            str(run["model-dir"]),
            _verbalizers(run["verbalizer-ids"]),
            int(run["pad-id"]),
            float(run["lr"]),
        )
        lm.load_adapter(msg.content["arrays"].to_torch_state_dict())
        rng = np.random.default_rng([seed, board, rnd])
        losses: list[float] = []
        t0 = time.perf_counter()
        for epoch in range(int(run["local-epochs"])):

            def say(n: int, total: int, loss: float, epoch: int = epoch) -> None:
                print(
                    f"board {board}, round {rnd}, epoch {epoch + 1}: "
                    f"batch {n}/{total}, loss {loss:.4f}",
                    flush=True,
                )

            losses += lm.train_epoch(train, labels, int(run["batch-size"]), rng, say)
        arrays = ArrayRecord(lm.adapter_state())
        metrics: dict[str, Any] = {
            "num-examples": len(train),
            "board": board,
            "train-loss": float(np.mean(losses)),
            "cpu-s": cpu_seconds(),
            "peak-rss-mb": peak_rss_mb(),
            "wait-s": waited,
            "train-s": time.perf_counter() - t0,
        }
    finally:
        slot.close()
    return Message(
        content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg
    )


def _fedavg_counting() -> type:
    from flwr.serverapp.strategy import FedAvg

    class CountingFedAvg(FedAvg):  # type: ignore[misc]
        """FedAvg that keeps, per round, the bytes of each message to and from each node."""

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.down: dict[int, dict[int, int]] = {}  # round -> node id -> bytes
            self.replies: dict[int, list[dict[str, Any]]] = {}

        def configure_train(
            self, server_round: int, arrays: Any, config: Any, grid: Any
        ) -> Iterable[Any]:
            messages = list(super().configure_train(server_round, arrays, config, grid))
            self.down[server_round] = {
                int(m.metadata.dst_node_id): message_bytes(m) for m in messages
            }
            return messages

        def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> Any:
            replies = list(replies)
            rows = []
            for m in replies:
                row: dict[str, Any] = {"node": int(m.metadata.src_node_id), "error": None}
                if m.has_error():
                    row["error"] = m.error.reason
                else:
                    row["bytes_up"] = message_bytes(m)
                    row.update({k: v for k, v in m.content["metrics"].items()})
                rows.append(row)
            self.replies[server_round] = rows
            return super().aggregate_train(server_round, replies)

    return CountingFedAvg


def server_main(grid: Any, context: Any) -> None:
    """The ServerApp: FedAvg over the boards' LoRA adapters for ``rounds`` rounds; an error is
    written to ``error.json`` (the bench stops at once instead of waiting) and raised again."""
    out = Path(str(context.run_config["out-dir"]))
    try:
        _server_main(grid, context)
    except BaseException as e:
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.json").write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        raise


def _server_main(grid: Any, context: Any) -> None:
    import torch
    from flwr.app import ArrayRecord, ConfigRecord
    from safetensors.torch import save_file

    from sidetune.bench.lora import LoraModel

    run = context.run_config
    out = Path(str(run["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    boards, rounds = int(run["boards"]), int(run["rounds"])
    torch.manual_seed(int(run["seed"]))  # the initial adapter on-device LoRA starts from
    lm = LoraModel(
        str(run["model-dir"]),
        _verbalizers(run["verbalizer-ids"]),
        int(run["pad-id"]),
        float(run["lr"]),
    )
    initial = ArrayRecord(lm.adapter_state())
    del lm
    strategy = _fedavg_counting()(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=boards,
        min_available_nodes=boards,
    )
    t_start = time.time()
    log = out / "rounds.jsonl"

    def after_round(server_round: int, arrays: Any) -> None:
        path = out / f"adapter-round-{server_round}.safetensors"
        save_file({k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}, str(path))
        row = {
            "round": server_round,
            "time": time.time(),
            "since_start_s": time.time() - t_start,
            "adapter": str(path),
            "down": strategy.down.get(server_round, {}),
            "replies": strategy.replies.get(server_round, []),
        }
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return None

    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=rounds,
        timeout=float(run["timeout-s"]),
        train_config=ConfigRecord({"lr": float(run["lr"])}),
        evaluate_fn=after_round,
    )
    (out / "done.json").write_text(json.dumps({"rounds": rounds, "time": time.time()}) + "\n")


# ------------------------------------------------------- the bench's own children (measure.py)


def adapter_size_child(cfg: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import save_file

    from sidetune.bench.lora import LoraModel

    lm = LoraModel(cfg["model_dir"], list(cfg["verbalizer_ids"]), int(cfg["pad_id"]), 3e-4)
    save_file({k: v.contiguous() for k, v in lm.adapter_state().items()}, cfg["out"])
    return {"bytes": Path(cfg["out"]).stat().st_size}


def score_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Held-out accuracy of each saved adapter (round 0 is the initial one)."""
    import torch
    from safetensors.torch import load_file

    from sidetune.bench.lora import LoraModel, ragged

    torch.set_num_threads(int(cfg["threads"]))
    with np.load(cfg["inputs"], allow_pickle=False) as z:
        hold, y = ragged(z["holdout_flat"], z["holdout_offsets"]), z["holdout_labels"]
    lm = LoraModel(cfg["model_dir"], list(cfg["verbalizer_ids"]), int(cfg["pad_id"]), 3e-4)
    out = []
    for path in cfg["adapters"]:
        lm.load_adapter(load_file(path))
        out.append(lm.evaluate(hold, y))
        print(f"{Path(path).name}: held-out accuracy {out[-1]:.4f}", flush=True)
    return {"accuracy": out}
