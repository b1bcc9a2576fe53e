"""SmoothQuant on an exported graph: per-channel activation outliers moved into the weights before int8.

A MatMul ``X·W`` equals ``(X / s)·(s·W)`` for any per-input-channel scale ``s``; with ``s_j =
max|X_j|^α / max|W_j|^(1-α)`` the activation's rare huge channels shrink (so one dynamic per-tensor
int8 scale no longer crushes the others) and the weights, quantized per output channel, take them.
The ``1/s`` is folded into what produces ``X``, so the graph stays the same function in fp32:

* q, k, v (and gate, up) read an RMSNorm whose last op multiplies by its weight γ: ``γ / s``;
* the down projection reads ``act(gate) * up``: up's weight columns ``/ s`` (the product is linear
  in up's output).

Other MatMuls (o_proj, after attention) are left as they are. ``max|X_j|`` is calibrated by running
the fp32 graph on CALIBRATION_TEXTS: generic text in the model's own formats (none from the
benchmarks' data sets), each sequence unpadded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Generic calibration text: plain prose, a review and a news-like paragraph in the chat format.
CALIBRATION_TEXTS = (
    "The weather was cold and grey all week, so we stayed inside and read books by the window.",
    "Review: a warm, funny film with a clever script and two wonderful leads .\nSentiment:",
    "Review: slow , predictable and far too long ; even the actors look bored .\nSentiment:",
    "The city council approved a new budget on Tuesday, raising spending on schools and roads "
    "while cutting the cost of public transport for students and pensioners.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital is",
    "<|im_start|>user\nSummarise this article in one line.\n\nShares in the carmaker rose 4% after it "
    "reported record quarterly sales in Europe and Asia, beating analysts' forecasts.<|im_end|>\n"
    "<|im_start|>assistant\nThe article says",
    "<|im_start|>user\nIs this review positive or negative?\n\nI expected more from the director: the "
    "story drags and the ending makes no sense.<|im_end|>\n<|im_start|>assistant\nThe review is",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Scientists have discovered a new species of frog in the rainforest; it is smaller than a coin "
    "and sings at night to attract a mate.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nTell me a short "
    "story about a dog who learns to swim.<|im_end|>\n<|im_start|>assistant\nOnce upon a time",
    "Prices at the market went up again this month: bread, milk and eggs all cost more than last year.",
    "The match ended 2-1 after a late goal in the ninety-third minute sent the home fans wild.",
)


def _constant(model: Any, name: str, init: dict[str, Any], producer: dict[str, Any]) -> str | None:
    """The initializer behind ``name`` (through Identity nodes: the exporter shares equal weights,
    e.g. the RMSNorm weights of a freshly initialised model, that way), or None."""
    while name not in init:
        p = producer.get(name)
        if p is None or p.op_type != "Identity":
            return None
        name = p.input[0]
    return name


def _groups(model: Any) -> dict[str, dict[str, Any]]:
    """activation tensor -> {"weights": [(node, input index) of the MatMul weights reading it],
    "fold": (kind, node, input index)}: kind "gamma" (RMSNorm weight) or "columns" (up's weight)."""
    init = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    groups: dict[str, dict[str, Any]] = {}
    for n in model.graph.node:
        if n.op_type != "MatMul" or len(n.input) != 2:
            continue
        if _constant(model, n.input[1], init, producer) is None:
            continue
        x = n.input[0]
        p = producer.get(x)
        if p is None or p.op_type != "Mul":
            continue
        fold = None
        for k, i in enumerate(p.input):
            c = _constant(model, i, init, producer)
            if c is not None and len(init[c].dims) == 1:
                fold = ("gamma", p, k)
        if fold is None:
            for i in p.input:
                q = producer.get(i)
                if (q is not None and q.op_type == "MatMul" and len(q.input) == 2
                        and _constant(model, q.input[1], init, producer) is not None):
                    fold = ("columns", q, 1)
                    break
        if fold is not None:
            groups.setdefault(x, {"weights": [], "fold": fold})["weights"].append((n, 1))
    return groups


def smooth_graph(model: Any, sequences: Sequence[Sequence[int]], alpha: float) -> dict[str, Any]:
    """Smooth ``model`` (an onnx ModelProto with its weights loaded) in place; what was done."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    groups = _groups(model)
    names = list(groups)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for x in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep X by name
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del probe
    amax = {x: np.zeros(1, np.float32) for x in names}
    for seq in sequences:
        ids = np.asarray([list(seq)], dtype=np.int64)
        outs = sess.run(names, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        for x, v in zip(names, outs, strict=True):
            amax[x] = np.maximum(amax[x], np.abs(v).reshape(-1, v.shape[-1]).max(0))
    del sess
    init = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    private: set[tuple[str, int]] = set()

    def get(node: Any, k: int) -> np.ndarray:
        name = _constant(model, node.input[k], init, producer)
        assert name is not None
        return numpy_helper.to_array(init[name]).astype(np.float32)

    def put(node: Any, k: int, a: np.ndarray) -> None:
        """Each touched weight becomes the node's own initializer (a shared one stays as it was)."""
        if (node.name, k) not in private:
            name = f"{node.input[k]}.smooth.{node.name}"
            model.graph.initializer.append(numpy_helper.from_array(a.astype(np.float32), name))
            init[name] = model.graph.initializer[-1]
            node.input[k] = name
            private.add((node.name, k))
        else:
            init[node.input[k]].CopyFrom(numpy_helper.from_array(a.astype(np.float32), node.input[k]))

    for x in names:
        ws = [get(node, k) for node, k in groups[x]["weights"]]
        wmax = np.max([np.abs(w).max(1) for w in ws], axis=0)  # per input channel (row of W [K, N])
        s = np.maximum(amax[x], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
        s = np.clip(s, 1e-4, 1e4)
        for (node, k), w in zip(groups[x]["weights"], ws, strict=True):
            put(node, k, w * s[:, None])
        kind, node, k = groups[x]["fold"]
        put(node, k, get(node, k) / (s if kind == "gamma" else s[None, :]))
    used = {i for n in model.graph.node for i in n.input}
    stale = [t for t in model.graph.initializer if t.name not in used]
    for t in stale:  # the shared originals no node reads any more
        model.graph.initializer.remove(t)
    return {"smoothed_activations": len(names), "calibration_sequences": len(sequences)}
