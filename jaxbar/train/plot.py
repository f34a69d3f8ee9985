"""Training curves from a `log.jsonl` file (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_curves"]


def plot_curves(runs: dict[str, Sequence[dict[str, Any]]], path: str | Path,
                title: str | None = None) -> Path:
    """Plots loss, accuracy and learning rate against the step.

    Args:
      runs: label → log records (`step`, `loss`, `accuracy`, `lr`; optional
        `eval_accuracy`); several runs share the axes.
      path: the PNG to write.
      title: figure title.

    Returns:
      The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    handles = []
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i}"
        train = [r for r in records if "loss" in r]
        steps = [r["step"] for r in train]
        (h,) = axes[0].plot(steps, [r["loss"] for r in train], color=color, label=label)
        handles.append(h)
        axes[1].plot(steps, [100 * r["accuracy"] for r in train], color=color, alpha=0.8)
        ev = [r for r in records if r.get("eval_accuracy") is not None]
        if ev:
            axes[1].plot([r["step"] for r in ev], [100 * r["eval_accuracy"] for r in ev], "o--",
                         color=color)
        lrs = [(r["step"], r["lr"]) for r in train if r.get("lr") is not None]
        if lrs:
            axes[2].plot(*zip(*lrs, strict=True), color=color)
    axes[0].set(xlabel="step", ylabel="cross-entropy loss", title="training loss")
    axes[1].set(xlabel="step", ylabel="top-1 accuracy (%)",
                title="accuracy (lines: training batches; dots: evaluation)")
    axes[2].set(xlabel="step", ylabel="learning rate", title="schedule")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="lower center", ncol=max(1, len(handles)), fontsize=9,
               frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
