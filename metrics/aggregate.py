"""Cross-validation summaries and side-by-side comparisons of reports."""

from __future__ import annotations

import statistics
from typing import Any


def mean_std(values: list[float | None]) -> dict[str, Any]:
    """Mean and standard deviation (population, as scikit-learn reports it)
    of the defined values; both ``None`` when no value is defined."""
    defined = [v for v in values if v is not None]
    if not defined:
        return {"mean": None, "std": None, "values": values}
    return {
        "mean": statistics.fmean(defined),
        "std": statistics.pstdev(defined),
        "values": values,
    }


def summarize_folds(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-fold reports.

    Args:
        folds: one entry per fold: ``{"fold", "run_dir", "val": report,
            "test": report}`` where each report is a ``report.json`` dict.
    """
    names = list(folds[0]["val"]["metrics"])
    notes = []
    summary: dict[str, Any] = {"val": {}, "test": {}}
    for split in ("val", "test"):
        for name in names:
            values = [fold[split]["metrics"].get(name) for fold in folds]
            summary[split][name] = mean_std(values)
            missing = [
                f["fold"] for f, v in zip(folds, values, strict=True) if v is None
            ]
            if missing and len(missing) < len(values):
                notes.append(
                    f"{split} {name} is undefined in fold(s) {missing}; "
                    "mean and std use the other folds"
                )
    return {
        "task": folds[0]["val"]["task"],
        "folds": len(folds),
        "metrics": summary["val"],
        "test": summary["test"],
        "per_fold": [
            {
                "fold": fold["fold"],
                "run_dir": fold["run_dir"],
                "val_samples": fold["val"]["num_samples"],
                "val": fold["val"]["metrics"],
                "test": fold["test"]["metrics"],
            }
            for fold in folds
        ],
        "notes": notes,
    }


def headline(report: dict[str, Any]) -> tuple[str, dict[str, float | None]]:
    """What a report's metrics measure, and the metrics: a run's split, or a
    cv report's held-out mean across folds."""
    if "per_fold" in report:
        means = {name: stats["mean"] for name, stats in report["metrics"].items()}
        return f"{report['folds']}-fold cv mean, held-out folds", means
    return f"{report.get('split', 'test')} split", dict(report["metrics"])
