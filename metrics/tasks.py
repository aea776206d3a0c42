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
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassROC,
)
from torchmetrics.utilities.compute import auc

# Target of the placeholder sample that a rank with no test batch feeds to the
# metrics, so that every rank joins their synchronisation; ignored by all of them.
IGNORE = -100

CLASSIFICATION = "classification"
LANGUAGE_MODEL = "language_model"


def _shared_metrics(num_classes: int, top_k: int, bins: int) -> dict[str, Any]:
    return {
        "accuracy": MulticlassAccuracy(
            num_classes, average="micro", ignore_index=IGNORE
        ),
        "top_k_accuracy": MulticlassAccuracy(
            num_classes,
            top_k=min(top_k, num_classes),
            average="micro",
            ignore_index=IGNORE,
        ),
        "calibration_error": MulticlassCalibrationError(
            num_classes, n_bins=bins, ignore_index=IGNORE
        ),
        "num_samples": SumMetric(),
    }


def classification_metrics(
    num_classes: int, top_k: int = 5, bins: int = 15
) -> MetricCollection:
    """Accuracy (top-1, top-k), precision/recall/F1 (macro, weighted, per class),
    one-vs-rest AUROC and ROC curves, calibration error, confusion matrix."""
    metrics = _shared_metrics(num_classes, top_k, bins)
    metrics["auroc"] = MulticlassAUROC(
        num_classes, average="macro", thresholds=None, ignore_index=IGNORE
    )
    metrics["roc"] = MulticlassROC(num_classes, thresholds=None, ignore_index=IGNORE)
    metrics["confusion_matrix"] = MulticlassConfusionMatrix(
        num_classes, ignore_index=IGNORE
    )
    for name, cls in (
        ("precision", MulticlassPrecision),
        ("recall", MulticlassRecall),
        ("f1", MulticlassF1Score),
    ):
        for average in ("macro", "weighted"):
            metrics[f"{name}_{average}"] = cls(
                num_classes, average=average, ignore_index=IGNORE
            )
        metrics[f"{name}_per_class"] = cls(
            num_classes, average=None, ignore_index=IGNORE
        )
    return MetricCollection(metrics, compute_groups=False)


def language_model_metrics(
    vocab_size: int, top_k: int = 5, bins: int = 15
) -> MetricCollection:
    """Cross-entropy per character, next-character accuracy (top-1, top-k), calibration."""
    metrics = _shared_metrics(vocab_size, top_k, bins)
    metrics["cross_entropy"] = MeanMetric()
    return MetricCollection(metrics, compute_groups=False)


def build_metrics(
    task: str, num_classes: int, top_k: int = 5, bins: int = 15
) -> MetricCollection:
    if task == CLASSIFICATION:
        return classification_metrics(num_classes, top_k, bins)
    return language_model_metrics(num_classes, top_k, bins)


def update_metrics(
    metrics: MetricCollection, logits: torch.Tensor, target: torch.Tensor
) -> None:
    """Feed one batch of logits and integer targets to a task's collection."""
    logits = logits.float()
    if len(target) == 0:  # a rank with nothing to evaluate still joins the sync
        logits = torch.zeros(1, logits.shape[-1], device=logits.device)
        target = torch.full((1,), IGNORE, dtype=torch.long, device=logits.device)
    counted = (target != IGNORE).float()
    probs = logits.softmax(dim=-1)
    for name, metric in metrics.items():
        if name == "num_samples":
            metric.update(counted.sum())
        elif name == "cross_entropy":
            losses = torch.nn.functional.cross_entropy(
                logits, target, reduction="none", ignore_index=IGNORE
            )
            metric.update(losses, weight=counted)
        else:
            metric.update(probs, target)


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
            "top_k_accuracy": float(values["top_k_accuracy"]),
            "calibration_error": float(values["calibration_error"]),
        }
        return {"num_samples": num_samples, "metrics": metrics, "notes": notes}

    confusion = values["confusion_matrix"].long()
    support = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    metrics = {
        name: float(values[name])
        for name in (
            "accuracy",
            "top_k_accuracy",
            "calibration_error",
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
        fpr, tpr, _ = values["roc"]
        row["auroc"] = float(auc(fpr[i], tpr[i], reorder=True))
        if predicted[i] == 0:
            row["precision"] = None
            effect = (
                "the macro and weighted precision count it as 0"
                if support[i] > 0
                else "the averages leave it out"
            )
            notes.append(
                f"precision of class {name} is undefined (never predicted); {effect}"
            )
        if support[i] == 0:
            row["recall"] = None
            row["auroc"] = None
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
