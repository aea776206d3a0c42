"""torchmetrics collections for each task, and their values as a plain report.

The collections are synchronised across ranks by torchmetrics itself; nothing
here averages by hand.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

CLASSIFICATION = "classification"
LANGUAGE_MODEL = "language_model"


def classification_metrics(num_classes: int) -> MetricCollection:
    """Accuracy, precision/recall/F1 (macro, weighted, per class), AUROC, confusion."""
    metrics: dict[str, Any] = {
        "accuracy": MulticlassAccuracy(num_classes, average="micro"),
        "auroc": MulticlassAUROC(num_classes, average="macro", thresholds=None),
        "confusion_matrix": MulticlassConfusionMatrix(num_classes),
        "num_samples": SumMetric(),
    }
    for name, cls in (
        ("precision", MulticlassPrecision),
        ("recall", MulticlassRecall),
        ("f1", MulticlassF1Score),
    ):
        for average in ("macro", "weighted"):
            metrics[f"{name}_{average}"] = cls(num_classes, average=average)
        metrics[f"{name}_per_class"] = cls(num_classes, average=None)
    return MetricCollection(metrics, compute_groups=False)


def language_model_metrics(vocab_size: int) -> MetricCollection:
    """Cross-entropy per character, next-character accuracy, sample count."""
    return MetricCollection(
        {
            "cross_entropy": MeanMetric(),
            "accuracy": MulticlassAccuracy(vocab_size, average="micro"),
            "num_samples": SumMetric(),
        },
        compute_groups=False,
    )


def build_metrics(task: str, num_classes: int) -> MetricCollection:
    if task == CLASSIFICATION:
        return classification_metrics(num_classes)
    return language_model_metrics(num_classes)


def update_metrics(
    metrics: MetricCollection, task: str, logits: torch.Tensor, target: torch.Tensor
) -> None:
    """Feed one batch of logits and integer targets to a task's collection."""
    logits = logits.float()
    count = torch.tensor(float(len(target)), device=logits.device)
    if task == CLASSIFICATION:
        probs = logits.softmax(dim=-1)
        for name, metric in metrics.items():
            if name == "num_samples":
                metric.update(count)
            else:
                metric.update(probs, target)
        return
    losses = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    metrics["cross_entropy"].update(losses)
    metrics["accuracy"].update(logits, target)
    metrics["num_samples"].update(count)


def summarize(
    values: dict[str, torch.Tensor], task: str, class_names: list[str]
) -> dict[str, Any]:
    """Turn computed metric values into the report's plain structure.

    Values that are undefined on the evaluated split (no sample of a class,
    a class never predicted) are ``None`` with a note saying why.
    """
    notes: list[str] = []
    num_samples = int(values["num_samples"].item())
    if task == LANGUAGE_MODEL:
        ce = float(values["cross_entropy"])
        metrics = {
            "cross_entropy": ce,
            "perplexity": math.exp(ce),
            "bits_per_char": ce / math.log(2),
            "accuracy": float(values["accuracy"]),
        }
        return {"num_samples": num_samples, "metrics": metrics, "notes": notes}

    confusion = values["confusion_matrix"].long()
    support = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    metrics = {
        name: float(values[name])
        for name in (
            "accuracy",
            "precision_macro",
            "precision_weighted",
            "recall_macro",
            "recall_weighted",
            "f1_macro",
            "f1_weighted",
        )
    }
    missing = [class_names[i] for i in range(len(support)) if support[i] == 0]
    if missing:
        metrics["auroc"] = None
        notes.append(
            f"auroc is undefined: class(es) {', '.join(missing)} have no sample "
            "in the evaluated split"
        )
    else:
        metrics["auroc"] = float(values["auroc"])
    per_class = []
    for i, name in enumerate(class_names):
        row: dict[str, Any] = {"class": name, "support": int(support[i])}
        for key in ("precision", "recall", "f1"):
            row[key] = float(values[f"{key}_per_class"][i])
        if predicted[i] == 0:
            row["precision"] = None
            notes.append(
                f"precision of class {name} is undefined (never predicted); "
                "the macro and weighted precision count it as 0"
            )
        if support[i] == 0:
            row["recall"] = None
            notes.append(
                f"recall of class {name} is undefined (no sample in the split)"
            )
        if support[i] == 0 and predicted[i] == 0:
            row["f1"] = None
        per_class.append(row)
    return {
        "num_samples": num_samples,
        "metrics": metrics,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "notes": notes,
    }
