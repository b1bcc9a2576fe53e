"""``sidetune bench cohort``'s report: the tables, the targets met and missed, the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NAMES = {
    "alone": "each board alone, sidetune ε = 2",
    "cohort": "cohort, pooled (ε = 2, real agents + server)",
    "cohort_personal": "cohort, federated + personal layer",
    "cohort_federated": "cohort, federated (board training, FedAvg)",
    "cohort_federated_dp": "cohort, federated, user-level DP",
    "cohort_clear": "cohort, labels in the clear",
    "lora_alone": "each board alone, on-device LoRA",
    "flower_fedavg_lora": "Flower FedAvg-LoRA",
    "central_lora": "central LoRA, pooled clear data",
}


def _f(x: Any, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def table(methods: dict[str, dict[str, Any]]) -> str:
    lines = ["| method | accuracy (mean) | worst board | bytes up / board | bytes down / board | device CPU-s / board "
             "| peak RSS MB | time to adapter s |", "|---|---|---|---|---|---|---|---|"]
    for m, r in methods.items():
        lines.append(f"| {NAMES.get(m, m)} (`{m}`) | {_f(r.get('accuracy_mean'), '.3f')} | "
                     f"{_f(r.get('accuracy_min'), '.3f')} | {_f(r.get('bytes_up_per_board'), ',.0f')} | "
                     f"{_f(r.get('bytes_down_per_board'), ',.0f')} | {_f(r.get('device_cpu_s_per_board'), '.1f')} | "
                     f"{_f(r.get('device_peak_rss_mb'), '.0f')} | {_f(r.get('time_to_adapter_s'), '.0f')} |")
    return "\n".join(lines)


def targets(methods: dict[str, dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """(target, met, figures) for the better of the pooled and the federated cohort."""
    fl, alone = methods.get("flower_fedavg_lora"), methods.get("alone")
    cands = [m for m in ("cohort", "cohort_federated") if m in methods]
    if not cands:
        return []
    best = max(cands, key=lambda m: methods[m]["accuracy_mean"])
    c = methods[best]
    out: list[tuple[str, bool | None, str]] = []

    def add(what: str, ok: bool | None, fig: str) -> None:
        out.append((f"{what} (`{best}`)", ok, fig))

    if fl:
        add("mean accuracy ≥ Flower − 1 point", c["accuracy_mean"] >= fl["accuracy_mean"] - 0.01,
            f"{c['accuracy_mean']:.3f} vs {fl['accuracy_mean']:.3f}")
        add("worst board ≥ Flower's worst − 2 points", c["accuracy_min"] >= fl["accuracy_min"] - 0.02,
            f"{c['accuracy_min']:.3f} vs {fl['accuracy_min']:.3f}")
        for key, k, what in (("device_cpu_s_per_board", 10, "device CPU"), ("device_peak_rss_mb", 3, "peak RSS")):
            if c.get(key) and fl.get(key):
                ratio = fl[key] / c[key]
                add(f"{what} ≥ {k}× below Flower's clients", ratio >= k, f"{ratio:.1f}×")
        ours = (c.get("bytes_up_per_board") or 0) + (c.get("bytes_down_per_board") or 0)
        theirs = (fl.get("bytes_up_per_board") or 0) + (fl.get("bytes_down_per_board") or 0)
        if ours and theirs:
            add("bytes per board ≥ 5× below Flower's", theirs / ours >= 5, f"{theirs / ours:.1f}×")
    if alone:
        add("≥ 5 points above each board alone", c["accuracy_mean"] >= alone["accuracy_mean"] + 0.05,
            f"{c['accuracy_mean']:.3f} vs {alone['accuracy_mean']:.3f}")
    cl, central = methods.get("cohort_clear"), methods.get("central_lora")
    if cl and central:
        out.append(("cohort in the clear ≥ central LoRA − 2 points", cl["accuracy_mean"] >= central["accuracy_mean"] - 0.02,
                    f"{cl['accuracy_mean']:.3f} vs {central['accuracy_mean']:.3f}"))
    other = [m for m in cands if m != best]
    if other:
        o = methods[other[0]]
        out.append((f"the other cohort mode (`{other[0]}`)", None,
                    f"{o['accuracy_mean']:.3f} mean, {o['accuracy_min']:.3f} worst"))
    return out


def write_report(results: dict[str, Any], out_dir: Path) -> Path:
    s = results["setup"]
    parts = [f"# sidetune bench cohort\n\nThe news task, {s['boards']} boards × {s['per_board']} training samples, "
             f"{s['holdout']} held out (every board scored on them), Dirichlet α = {s['alpha']}; side networks "
             f"{s['epochs']} epochs; federated: {s['federated_rounds']} rounds of {s['federated_local_epochs']} "
             f"local epochs. {results.get('seconds', 0) / 60:.1f} min in all.\n"]
    for kind, r in results["shards"].items():
        parts.append(f"## {kind} shards\n\n{table(r['methods'])}\n")
        t = targets(r["methods"])
        if t:
            parts.append("\n".join(f"- {'✔' if ok else ('✘' if ok is not None else '·')} {what}: {fig}"
                                   for what, ok, fig in t) + "\n")
        sr = r["details"]["side_rows"]
        fed = sr.get("cohort_federated", {})
        if fed.get("by_round"):
            parts.append("The federated cohort round by round (held-out accuracy, mean / worst board): " + ", ".join(
                f"{i + 1}: {m:.3f} / {w:.3f}" for i, (m, w) in enumerate(fed["by_round"]))
                + f" (the row: the agent's default, {fed['rounds']} rounds).\n")
        if "pooled_hostile_member" in sr:
            parts.append(f"One hostile member of {s['boards']} (board 0 sends its targets negated and 10× too large; "
                         f"targets clipped, equal shares): the other boards' mean accuracy "
                         f"{sr['pooled_hostile_member']['others_mean']:.3f} with it, "
                         f"{sr['pooled_offline']['others_mean']:.3f} without (pooled on the server, offline).\n")
        dp = r["details"]["side_rows"].get("cohort_federated_dp")
        if dp:
            parts.append(f"User-level DP of the federated cohort (clip {dp['clip']}, noise multiplier "
                         f"{dp['noise_multiplier']}, ε = {dp['user_dp_epsilon']:.1f} at δ = 1e-5 over "
                         f"{s['federated_rounds']} rounds): mean {sum(dp['accuracies']) / len(dp['accuracies']):.3f}, "
                         f"worst {min(dp['accuracies']):.3f}.\n")
    plot(results, out_dir / "cohort-accuracy-cpu.png")
    parts.append("![accuracy against device CPU](cohort-accuracy-cpu.png)\n")
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    return path


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(results["shards"]), figsize=(6 * len(results["shards"]), 4.5), squeeze=False)
    for ax, (kind, r) in zip(axes[0], results["shards"].items()):
        for m, v in r["methods"].items():
            x, y = v.get("device_cpu_s_per_board"), v.get("accuracy_mean")
            if x is None or y is None:
                continue
            ax.scatter([x], [y], s=40)
            ax.annotate(m, (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("device CPU-s per board (log)")
        ax.set_ylabel("held-out accuracy (mean over boards)")
        ax.set_title(f"news, {kind} shards")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
