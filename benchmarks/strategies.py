"""Strategies side by side: the same model, data and global batch, one run.

    .venv/bin/python benchmarks/strategies.py [--data mnist|digits] [--epochs N]

Every configuration runs `dltrain fit` with one thread per process, so the
single-process row is the compute of one rank and the others show what the
strategy adds or saves. The figures come from each run's manifest.json:
training samples per second (median of the epochs after the first, validation
excluded), peak resident memory and parameter bytes held, per rank. For the
pipeline the table also gives the bubble-limited ideal: the single-process
throughput times the number of stages times (1 - bubble fraction) of its
schedule, i.e. perfect balance and free communication.

Writes benchmarks/results/strategies.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = Path(os.environ.get("DLTRAIN_DATA", REPO.parent / "shared" / "data"))
GLOBAL_BATCH = 128

# name, processes, overrides (the batch is per data-parallel replica)
CONFIGS: list[tuple[str, int, list[str]]] = [
    ("single", 1, [f"data.batch_size={GLOBAL_BATCH}"]),
    ("ddp", 2, ["strategy=ddp", f"data.batch_size={GLOBAL_BATCH // 2}"]),
    ("fsdp", 2, ["strategy=fsdp", f"data.batch_size={GLOBAL_BATCH // 2}"]),
    (
        "pipeline gpipe m=4",
        2,
        ["strategy=pipeline", "strategy.schedule=gpipe", "strategy.microbatches=4"],
    ),
    (
        "pipeline 1f1b m=4",
        2,
        ["strategy=pipeline", "strategy.schedule=1f1b", "strategy.microbatches=4"],
    ),
    (
        "pipeline 1f1b m=8",
        2,
        ["strategy=pipeline", "strategy.schedule=1f1b", "strategy.microbatches=8"],
    ),
]


def dltrain() -> str:
    exe = Path(sys.executable).with_name("dltrain")
    return str(exe) if exe.exists() else "dltrain"


def run(name: str, procs: int, overrides: list[str], common: list[str], root: Path):
    folder = root / name.replace(" ", "_").replace("=", "")
    batch = (
        []
        if any(o.startswith("data.batch_size") for o in overrides)
        else [f"data.batch_size={GLOBAL_BATCH}"]
    )
    argv = [
        dltrain(),
        "fit",
        *common,
        *overrides,
        *batch,
        f"trainer.devices={procs}",
        f"run.dir={folder}",
        "report.plots=false",
        "trainer.progress=none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((folder / "manifest.json").read_text())
    report = json.loads((folder / "report.json").read_text())
    return {
        "name": name,
        "processes": procs,
        "command": " ".join(argv[1:-3]),
        "samples_per_s": manifest["throughput"]["train_samples_per_s"],
        "per_epoch": manifest["throughput"]["per_epoch"],
        "ranks": manifest["ranks"],
        "pipeline": manifest.get("pipeline"),
        "test_accuracy": report["metrics"].get("accuracy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("mnist", "digits"), default="mnist")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    from dltrain.trainers.pipeline import bubble_fraction

    common = [f"trainer.max_epochs={args.epochs}", "model.dropout=0"]
    if args.data == "mnist":
        common += ["data=mnist", f"data.root={DATA / 'mnist'}"]
    root = Path(tempfile.mkdtemp(prefix="dltrain-bench-"))
    try:
        rows = [run(name, n, o, common, root) for name, n, o in CONFIGS]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = rows[0]
    full_bytes = base["ranks"][0]["parameter_bytes"]
    for row in rows:
        row["vs_single"] = round(row["samples_per_s"] / base["samples_per_s"], 3)
        row["parameter_share_per_rank"] = [
            round(r["parameter_bytes"] / full_bytes, 3) for r in row["ranks"]
        ]
        if row["pipeline"]:
            m = int(row["name"].split("m=")[1])
            schedule = row["name"].split()[1]
            p = len(row["pipeline"]["stages"])
            bubble = bubble_fraction(schedule, p, m)
            ideal = base["samples_per_s"] * p * (1 - bubble)
            row["bubble_fraction"] = round(bubble, 3)
            row["ideal_samples_per_s"] = round(ideal, 1)
            row["of_ideal"] = round(row["samples_per_s"] / ideal, 3)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "taken": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "data": args.data,
        "epochs": args.epochs,
        "global_batch": GLOBAL_BATCH,
        "rows": rows,
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "strategies.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "strategies.md").write_text(to_markdown(result))
    print(to_markdown(result))


def to_markdown(result: dict) -> str:
    lines = [
        f"Strategies on {result['data']}, CNN, global batch {result['global_batch']}, "
        f"{result['epochs']} epochs, one thread per process; {result['machine']}, "
        f"Python {result['python']}, {result['taken']}.",
        "",
        "| strategy | processes | train samples/s | vs single | peak RSS per rank (MB) "
        "| parameters held per rank (share of the model) | pipeline ideal samples/s "
        "(bubble) | of ideal | test accuracy |",
        "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        rss = " / ".join(f"{r['peak_rss_mb']:.0f}" for r in row["ranks"])
        share = " / ".join(f"{s:.3f}" for s in row["parameter_share_per_rank"])
        ideal = (
            f"{row['ideal_samples_per_s']:.0f} ({row['bubble_fraction']:.0%})"
            if "ideal_samples_per_s" in row
            else ""
        )
        of_ideal = f"{row['of_ideal']:.2f}" if "of_ideal" in row else ""
        lines.append(
            f"| {row['name']} | {row['processes']} | {row['samples_per_s']:.0f} | "
            f"{row['vs_single']:.2f} | {rss} | {share} | {ideal} | {of_ideal} | "
            f"{row['test_accuracy']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
