"""The run's picture: global AUROC per round and each hospital's ε against the target."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_report(history: dict[str, Any], status: dict[str, Any], path: Path) -> Path:
    """Write a two-panel PNG (AUROC per round, ε per round per hospital) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = history.get("rounds", [])
    xs = [r["round"] for r in rounds]
    fig, (ax_auc, ax_eps) = plt.subplots(1, 2, figsize=(11, 4.2))

    def series(key: str) -> list[float]:
        return [
            float("nan") if r["evaluation"].get(key) is None else r["evaluation"][key]
            for r in rounds
        ]

    hospitals = sorted(
        {h for r in rounds for h in (r.get("hospitalEvaluation") or {})}
        | {h for r in rounds for h in (r.get("epsilon") or {})}
    )
    for name in hospitals:
        ys = [((r.get("hospitalEvaluation") or {}).get(name) or {}).get("auroc") for r in rounds]
        ax_auc.plot(
            xs,
            [float("nan") if y is None else y for y in ys],
            marker=".",
            linewidth=1,
            alpha=0.7,
            label=name,
        )
    ax_auc.plot(
        xs,
        series("auroc"),
        marker="o",
        linewidth=2.5,
        color="black",
        label="global: mean of the hospitals' (weighted)",
    )
    ax_auc.plot(
        xs,
        series("pooledAuroc"),
        marker="s",
        linewidth=1.5,
        linestyle="--",
        color="grey",
        label="global: all test rows pooled",
    )
    ax_auc.set(title="AUROC of the global model, held-out splits", xlabel="round", ylabel="AUROC")
    ax_auc.grid(alpha=0.3)
    ax_auc.legend(fontsize=8)

    for name in hospitals:
        ys = [(r.get("epsilon") or {}).get(name) for r in rounds]
        ax_eps.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=name)
    target = (status.get("privacy") or {}).get("targetEpsilon") or history.get("targetEpsilon")
    if target is not None:
        ax_eps.axhline(float(target), color="red", linestyle="--", label=f"target ε={target}")
    ax_eps.set(title="ε spent per hospital", xlabel="round", ylabel="ε")
    ax_eps.grid(alpha=0.3)
    ax_eps.legend(fontsize=8)
    for ax in (ax_auc, ax_eps):
        ax.set_xticks(xs)
    fig.suptitle(f"{history.get('run', '')}: {status.get('phase', '')}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
