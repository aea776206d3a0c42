"""The report as a rich table on the terminal and as Markdown."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


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
        for column in ("class", "precision", "recall", "f1", "support"):
            per_class.add_column(column, justify="right")
        for row in report["per_class"]:
            per_class.add_row(
                *(
                    _fmt(row[c])
                    for c in ("class", "precision", "recall", "f1", "support")
                )
            )
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


def to_markdown(report: dict[str, Any]) -> str:
    """The same report as Markdown, for report.md."""
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
            "| class | precision | recall | f1 | support |",
        ]
        lines.append("| --- | ---: | ---: | ---: | ---: |")
        for row in report["per_class"]:
            cells = (
                _fmt(row[c]) for c in ("class", "precision", "recall", "f1", "support")
            )
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
    return "\n".join(lines) + "\n"
