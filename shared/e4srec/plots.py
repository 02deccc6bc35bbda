"""Plots a stage logs beside its metrics: where a picture says more than a table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(log: Sequence[dict[str, Any]], metric: str = "valid/full/NDCG@10") -> Any:
    """Loss per epoch and the early-stopping metric per evaluation, on two axes."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    epochs = [r["epoch"] for r in log]
    a.plot(epochs, [r["train/loss"] for r in log], color="#4C72B0")
    a.set(xlabel="epoch", ylabel="training loss", title="Loss")
    evals = [r for r in log if metric in r]
    b.plot([r["epoch"] for r in evals], [r[metric] for r in evals], marker=".", color="#55A868")
    if evals:
        best = max(evals, key=lambda r: r[metric])
        b.axvline(best["epoch"], color="#C44E52", ls="--", label=f"best epoch {best['epoch']}")
        b.legend()
    b.set(xlabel="epoch", ylabel=metric, title="Validation")
    fig.tight_layout()
    return fig


def step_curves(log: Sequence[dict[str, Any]]) -> Any:
    """Loss, learning rate and throughput per optimizer step, side by side."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    steps = [r["step"] for r in log]
    for ax, key, color in zip(axes, ("train/loss", "train/lr", "train/examples_per_second"),
                              ("#4C72B0", "#55A868", "#DD8452")):
        ax.plot(steps, [r[key] for r in log], color=color)
        ax.set(xlabel="optimizer step", title=key.split("/")[1].replace("_", " "))
    fig.tight_layout()
    return fig


def metrics_by_length(groups: dict[str, dict[str, dict[str, float]]], metric: str = "NDCG@10", title: str = "") -> Any:
    """Bars of `metric` per history-length group, one colour per protocol, user counts on the axis."""
    protocols = list(groups)
    labels = list(next(iter(groups.values())))
    fig, axes = plt.subplots(1, len(protocols), figsize=(5 * len(protocols), 3.4), squeeze=False)
    for ax, protocol, color in zip(axes[0], protocols, ("#4C72B0", "#DD8452")):
        values = [groups[protocol][g][metric] for g in labels]
        ax.bar(range(len(labels)), values, color=color)
        ax.set_xticks(range(len(labels)), [f"{g}\n({groups[protocol][g]['users']:,})" for g in labels], fontsize=8)
        ax.set(xlabel="history length (users)", ylabel=metric, title=f"{title} {protocol} ranking".strip())
    fig.tight_layout()
    return fig
