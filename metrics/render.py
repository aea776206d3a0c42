"""The report as a rich table on the terminal and as Markdown."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

PER_CLASS = ("class", "precision", "recall", "f1", "auroc", "support")


def _fmt(value: Any) -> str:
    if value is None:
        return "undefined"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def print_report(report: dict[str, Any], console: Console) -> None:
    """Print the headline metrics, the per-class table and the confusion matrix."""
    task = report["task"].replace("_", " ")
    console.print(
        f"[bold]{task} report[/]: {report['split']} split, {report['num_samples']} samples"
    )
    table = Table(show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in report["metrics"].items():
        table.add_row(name, _fmt(value))
    console.print(table)

    if report.get("per_class"):
        per_class = Table(title="per class", header_style="bold")
        for column in PER_CLASS:
            per_class.add_column(column, justify="right")
        for row in report["per_class"]:
            per_class.add_row(*(_fmt(row[c]) for c in PER_CLASS))
        console.print(per_class)

    if report.get("confusion_matrix"):
        names = [row["class"] for row in report["per_class"]]
        confusion = Table(title="confusion matrix (rows: true, columns: predicted)")
        confusion.add_column("")
        for name in names:
            confusion.add_column(name, justify="right")
        for name, row in zip(names, report["confusion_matrix"], strict=True):
            confusion.add_row(name, *(str(v) for v in row))
        console.print(confusion)
    for note in report.get("notes", []):
        console.print(f"note: {note}")


def to_markdown(report: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """The same report as Markdown, for report.md; ``plots`` maps titles to PNG paths."""
    lines = [
        f"# {report['task']} report",
        "",
        f"- run: `{report.get('run_dir', '')}`",
        f"- checkpoint: `{report.get('checkpoint', '')}`",
        f"- split: {report['split']} ({report['num_samples']} samples)",
        f"- data: {report.get('data', '')}",
        "",
        "| metric | value |",
        "| --- | ---: |",
    ]
    lines += [
        f"| {name} | {_fmt(value)} |" for name, value in report["metrics"].items()
    ]
    if report.get("per_class"):
        lines += [
            "",
            "## Per class",
            "",
            "| " + " | ".join(PER_CLASS) + " |",
        ]
        lines.append("| --- |" + " ---: |" * (len(PER_CLASS) - 1))
        for row in report["per_class"]:
            cells = (_fmt(row[c]) for c in PER_CLASS)
            lines.append("| " + " | ".join(cells) + " |")
    if report.get("confusion_matrix"):
        names = [row["class"] for row in report["per_class"]]
        lines += ["", "## Confusion matrix (rows: true, columns: predicted)", ""]
        lines.append("| | " + " | ".join(names) + " |")
        lines.append("| --- |" + " ---: |" * len(names))
        for name, row in zip(names, report["confusion_matrix"], strict=True):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    for title, path in (plots or {}).items():
        lines += ["", f"## {title.capitalize()}", "", f"![{title}]({path})"]
    return "\n".join(lines) + "\n"


def _pm(stats: dict[str, Any]) -> str:
    if stats["mean"] is None:
        return "undefined"
    return f"{stats['mean']:.4f} ± {stats['std']:.4f}"


def print_cv(report: dict[str, Any], console: Console) -> None:
    """Mean ± std of every metric across folds, then one row per fold."""
    console.print(
        f"[bold]{report['folds']}-fold cross-validation[/]: mean ± std across folds"
    )
    table = Table(header_style="bold")
    for column in ("metric", "held-out folds", "test split"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for name, stats in report["metrics"].items():
        table.add_row(name, _pm(stats), _pm(report["test"][name]))
    console.print(table)
    per_fold = Table(title="per fold", header_style="bold")
    names = [n for n in ("accuracy", "f1_macro", "auroc") if n in report["metrics"]]
    per_fold.add_column("fold", justify="right")
    for name in names:
        per_fold.add_column(f"val {name}", justify="right")
        per_fold.add_column(f"test {name}", justify="right")
    for row in report["per_fold"]:
        cells = [str(row["fold"])]
        for name in names:
            cells += [_fmt(row["val"][name]), _fmt(row["test"][name])]
        per_fold.add_row(*cells)
    console.print(per_fold)
    for note in report.get("notes", []):
        console.print(f"note: {note}")


def cv_markdown(report: dict[str, Any]) -> str:
    """The cross-validation report as Markdown."""
    lines = [
        f"# {report['folds']}-fold cross-validation ({report['task']})",
        "",
        "Mean ± standard deviation across folds: each fold's best checkpoint scored",
        "on its held-out fold, and on the common test split.",
        "",
        "| metric | held-out folds | test split |",
        "| --- | ---: | ---: |",
    ]
    for name, stats in report["metrics"].items():
        lines.append(f"| {name} | {_pm(stats)} | {_pm(report['test'][name])} |")
    names = list(report["metrics"])
    lines += ["", "## Per fold (held-out fold / test split)", ""]
    lines.append("| fold | " + " | ".join(names) + " |")
    lines.append("| --- |" + " ---: |" * len(names))
    for row in report["per_fold"]:
        cells = [f"{_fmt(row['val'][n])} / {_fmt(row['test'][n])}" for n in names]
        lines.append(f"| {row['fold']} | " + " | ".join(cells) + " |")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def print_comparison(
    names: list[str], metrics: list[dict[str, Any]], console: Console
) -> None:
    """Several runs side by side: one row per metric, one column per run."""
    table = Table(header_style="bold")
    table.add_column("metric")
    for name in names:  # run paths are not cut short: they tell the runs apart
        table.add_column(name, justify="right", overflow="fold")
    keys = list(dict.fromkeys(k for m in metrics for k in m))
    for key in keys:
        table.add_row(key, *(_fmt(m.get(key)) for m in metrics))
    console.print(table)
