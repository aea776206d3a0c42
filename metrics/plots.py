"""PNG plots of a report: confusion matrix, one-vs-rest ROC curves, history.

matplotlib is imported lazily with the file-only Agg backend, so no display is
needed and importing this module costs nothing until a plot is drawn.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix: list[list[int]], names: list[str], path: Path) -> Path:
    """Counts, rows true and columns predicted."""
    plt = _pyplot()
    size = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            if count:
                colour = "white" if count > peak / 2 else "black"
                ax.text(
                    j, i, str(count), ha="center", va="center", color=colour, fontsize=8
                )
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title("confusion matrix")
    return _save(plt, fig, path)


def plot_roc(
    curves: Any, names: list[str], aurocs: dict[str, float | None], path: Path
) -> Path:
    """One-vs-rest ROC curve of each class; ``curves`` is (fpr, tpr, thresholds)."""
    plt = _pyplot()
    fpr, tpr, _ = curves
    fig, ax = plt.subplots(figsize=(6, 6))
    for i, name in enumerate(names):
        area = aurocs.get(name)
        label = (
            f"{name} (AUC {area:.3f})" if area is not None else f"{name} (no positives)"
        )
        ax.plot(fpr[i].numpy(), tpr[i].numpy(), label=label, linewidth=1)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, one class against the rest")
    ax.legend(fontsize=7, loc="lower right", ncol=2 if len(names) > 10 else 1)
    return _save(plt, fig, path)


def read_history(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch values of each column of Lightning's CSV log."""
    history: dict[str, list[tuple[int, float]]] = {}
    if not metrics_csv.is_file():
        return history
    with metrics_csv.open() as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key in ("epoch", "step") or value in ("", None):
                    continue
                history.setdefault(key, []).append(
                    (int(row["epoch"]) + 1, float(value))
                )
    return history


def plot_history(metrics_csv: Path, main_metric: str, path: Path) -> Path | None:
    """Training and validation loss, and the main validation metric, per epoch."""
    history = read_history(metrics_csv)
    if not history.get("val_loss"):
        return None
    plt = _pyplot()
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "--")):
        if history.get(key):
            epochs, values = zip(*history[key], strict=True)
            loss_ax.plot(epochs, values, style, marker="o", markersize=3, label=key)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.legend()
    loss_ax.set_title("loss")
    if history.get(main_metric):
        epochs, values = zip(*history[main_metric], strict=True)
        metric_ax.plot(epochs, values, marker="o", markersize=3, color="tab:green")
    metric_ax.set_xlabel("epoch")
    metric_ax.set_title(main_metric)
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, metric_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
