"""What dltrain costs on top of the training it runs, side by side in one run.

    .venv/bin/python benchmarks/overhead.py [--epochs 3] [--repeats 3] [--device cpu|cuda]

Same model (the default CNN), data (the real MNIST test set, split 80/10/10),
batch size (64), epochs and threads for every contender:

- a plain PyTorch training loop (the floor),
- Lightning's Trainer used directly, stripped bare (no logger, bar, checkpoints),
- Lightning's Trainer with its defaults (progress bar, CSV logger, an accuracy
  metric logged every step),
- `dltrain fit` (its own figure from the run's manifest.json).

Training samples per second are the median over the epochs after the first
(warm-up) of every repetition, validation excluded; the spread is min..max over
repetitions. Evaluation: a plain inference loop against `dltrain eval` (its
whole test phase: loading, forward passes, every metric of the report).
Start-up: `dltrain --help`, `dltrain fit --help` and `python -c "import torch"`,
and the seconds from the `dltrain fit` command to its first training step.
Time to accuracy: seconds from the command until the default CNN's validation
accuracy on MNIST reaches 0.97 (and its test accuracy at the end), and until the
RNN's validation perplexity on tinyshakespeare reaches 7.0 (`--no-text` skips it).

Writes benchmarks/results/overhead.{md,json}.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = Path(os.environ.get("DLTRAIN_DATA", REPO.parent / "shared" / "data"))
BATCH = 64
SEED = 42


def dltrain_exe() -> str:
    exe = Path(sys.executable).with_name("dltrain")
    return str(exe) if exe.exists() else "dltrain"


def mnist():
    from dltrain.data.datamodules import ImageDataModule
    from dltrain.data.readers import load_mnist

    return ImageDataModule(load_mnist(DATA / "mnist"), BATCH, 0.1, 0.1, SEED)


def new_model(data) -> nn.Module:
    from dltrain.models.cnn import CNN

    torch.manual_seed(SEED)
    return CNN(data.info.input_shape, data.info.num_classes)


def steady(per_epoch: list[float]) -> list[float]:
    return per_epoch[1:] or per_epoch


# ------------------------------------------------------------------ contenders


def plain_loop(data, epochs: int, device: str) -> list[float]:
    """Samples per second of each epoch of the loop a user would write."""
    model = new_model(data).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(SEED)
    loader = DataLoader(data.train_set, BATCH, shuffle=True, generator=generator)
    rates = []
    for _ in range(epochs):
        model.train()
        seen, begin = 0, time.perf_counter()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(y)
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - begin))
    return rates


def plain_inference(data, device: str) -> float:
    model = new_model(data).to(device).eval()
    loader = DataLoader(data.test_set, BATCH)
    correct = seen = 0
    begin = time.perf_counter()
    with torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += (model(x).argmax(1) == y).sum()
            seen += len(y)
    int(correct)  # the result reaches the host
    return seen / (time.perf_counter() - begin)


def lightning_loop(data, epochs: int, device: str, defaults: bool) -> list[float]:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger
    from torchmetrics.classification import MulticlassAccuracy

    from dltrain.trainers.measure import Throughput

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = new_model(data)
            self.acc = MulticlassAccuracy(data.info.num_classes)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
            if defaults:
                self.log("train_loss", loss, prog_bar=True)
                self.log("train_acc", self.acc(logits, y), prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    generator = torch.Generator().manual_seed(SEED)
    loader = DataLoader(data.train_set, BATCH, shuffle=True, generator=generator)
    throughput = Throughput()
    folder = Path(tempfile.mkdtemp(prefix="dltrain-bench-pl-"))
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_epochs=epochs,
        logger=CSVLogger(folder) if defaults else False,
        enable_checkpointing=False,
        enable_progress_bar=defaults,
        enable_model_summary=False,
        callbacks=[throughput],
        default_root_dir=folder,
    )
    trainer.fit(Module(), loader)
    shutil.rmtree(folder, ignore_errors=True)
    return throughput.epochs


def run_dltrain(args: list[str], cwd: Path, threads: int) -> tuple[float, float]:
    """Run `dltrain ARGS` (a fit or an eval); return launch time and seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    launched = time.time()
    proc = subprocess.run(
        [dltrain_exe(), *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"dltrain {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return launched, time.time() - launched


def dltrain_fit(cwd: Path, epochs: int, device: str, threads: int, name: str) -> dict:
    run = cwd / name
    args = [
        "fit",
        "data=mnist",
        f"data.root={DATA / 'mnist'}",
        f"data.batch_size={BATCH}",
        f"trainer.max_epochs={epochs}",
        f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        "trainer.progress=none",
        "report.plots=false",
        f"run.dir={run}",
    ]
    launched, seconds = run_dltrain(args, cwd, threads)
    manifest = json.loads((run / "manifest.json").read_text())
    return {
        "launched": launched,
        "seconds": seconds,
        "throughput": manifest["throughput"],
        "run": run,
    }


def timed(command: list[str], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def val_curve(run: Path, key: str) -> list[float]:
    with (run / "logs" / "metrics.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get(key)]
    return [float(r[key]) for r in rows]


# ------------------------------------------------------------------ the table


def summarize(name: str, rates: list[list[float]]) -> dict:
    medians = [statistics.median(steady(r)) for r in rates]
    return {
        "name": name,
        "samples_per_s": round(statistics.median(medians), 1),
        "spread": [round(min(medians), 1), round(max(medians), 1)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--no-text", action="store_true", help="skip the RNN run")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    data = mnist()
    data.setup("fit")
    work = Path(tempfile.mkdtemp(prefix="dltrain-bench-"))
    rates: dict[str, list[list[float]]] = {
        "plain PyTorch loop": [],
        "Lightning, bare": [],
        "Lightning, defaults": [],
        "dltrain fit": [],
    }
    first_steps, fits = [], []
    try:
        for r in range(args.repeats):  # interleaved: drifts hit every contender
            rates["plain PyTorch loop"].append(
                plain_loop(data, args.epochs, args.device)
            )
            rates["Lightning, bare"].append(
                lightning_loop(data, args.epochs, args.device, defaults=False)
            )
            rates["Lightning, defaults"].append(
                lightning_loop(data, args.epochs, args.device, defaults=True)
            )
            fit = dltrain_fit(work, args.epochs, args.device, threads, f"fit{r}")
            rates["dltrain fit"].append(fit["throughput"]["per_epoch"])
            first_steps.append(fit["throughput"]["first_step_unix"] - fit["launched"])
            fits.append(fit)
        training = [summarize(name, r) for name, r in rates.items()]
        floor = training[0]["samples_per_s"]
        for row in training:
            row["vs_plain"] = round(row["samples_per_s"] / floor, 3)

        plain_eval = [plain_inference(data, args.device) for _ in range(args.repeats)]
        dl_eval = []
        for fit in fits:
            run_dltrain(["eval", str(fit["run"]), "--json"], work, threads)
            reports = sorted((fit["run"] / "eval").glob("*/report.json"))
            dl_eval.append(json.loads(reports[-1].read_text())["test_samples_per_s"])
        evaluation = [
            {
                "name": "plain inference loop",
                "samples_per_s": round(statistics.median(plain_eval), 1),
            },
            {
                "name": "dltrain eval (test phase)",
                "samples_per_s": round(statistics.median(dl_eval), 1),
            },
        ]
        evaluation[1]["vs_plain"] = round(
            evaluation[1]["samples_per_s"] / evaluation[0]["samples_per_s"], 3
        )

        startup = {
            "dltrain --help": round(timed([dltrain_exe(), "--help"]), 3),
            "dltrain fit --help": round(timed([dltrain_exe(), "fit", "--help"]), 3),
            'python -c "import torch"': round(
                timed([sys.executable, "-c", "import torch"]), 3
            ),
            "dltrain fit: command to first training step": round(
                statistics.median(first_steps), 2
            ),
        }

        accuracy = time_to_targets(work, args.device, threads, not args.no_text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "device": args.device,
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "taken": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "epochs": args.epochs,
        "repeats": args.repeats,
        "batch": BATCH,
        "training": training,
        "evaluation": evaluation,
        "startup_s": startup,
        "time_to_target": accuracy,
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    suffix = "" if args.device == "cpu" else "_gpu"
    (out / f"overhead{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"overhead{suffix}.md").write_text(to_markdown(result))
    print(to_markdown(result))


def time_to_targets(work: Path, device: str, threads: int, text: bool) -> list[dict]:
    targets = []
    fit = dltrain_fit(work, 8, device, threads, "tta-mnist")
    accuracy = val_curve(fit["run"], "val_acc")
    ends = fit["throughput"]["epoch_end_unix"]
    reached = next((i for i, a in enumerate(accuracy) if a >= 0.97), None)
    report = json.loads((fit["run"] / "report.json").read_text())
    targets.append(
        {
            "run": "CNN on MNIST (default config, data=mnist)",
            "target": "validation accuracy >= 0.97",
            "seconds": round(ends[reached] - fit["launched"], 1)
            if reached is not None
            else None,
            "epochs": None if reached is None else reached + 1,
            "final_test": f"accuracy {report['metrics']['accuracy']:.4f}",
        }
    )
    if text:
        run = work / "tta-text"
        launched, _ = run_dltrain(
            [
                "fit",
                "--config",
                str(REPO / "examples" / "shakespeare.yaml"),
                f"data.path={DATA / 'tinyshakespeare.txt'}",
                f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
                "trainer.progress=none",
                "report.plots=false",
                f"run.dir={run}",
            ],
            work,
            threads,
        )
        losses = val_curve(run, "val_loss")
        ends = json.loads((run / "manifest.json").read_text())["throughput"][
            "epoch_end_unix"
        ]
        reached = next((i for i, v in enumerate(losses) if math.exp(v) <= 7.0), None)
        report = json.loads((run / "report.json").read_text())
        targets.append(
            {
                "run": "BiLSTM on tinyshakespeare (examples/shakespeare.yaml)",
                "target": "validation perplexity <= 7.0",
                "seconds": round(ends[reached] - launched, 1)
                if reached is not None
                else None,
                "epochs": None if reached is None else reached + 1,
                "final_test": f"perplexity {report['metrics']['perplexity']:.2f}",
            }
        )
    return targets


def to_markdown(r: dict) -> str:
    lines = [
        f"{r['device'].upper()}, {r['threads']} thread(s); {r['machine']}; Python "
        f"{r['python']}, torch {r['torch']}; {r['taken']}. Default CNN on MNIST, batch "
        f"{r['batch']}, {r['epochs']} epochs x {r['repeats']} repetitions (first epoch "
        "of each is warm-up).",
        "",
        "| training | samples/s (median) | spread | vs plain loop |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in r["training"]:
        lo, hi = row["spread"]
        lines.append(
            f"| {row['name']} | {row['samples_per_s']:.0f} | {lo:.0f}..{hi:.0f} | "
            f"{row['vs_plain']:.3f} |"
        )
    lines += ["", "| evaluation | samples/s | vs plain loop |", "| --- | ---: | ---: |"]
    for row in r["evaluation"]:
        ratio = f"{row['vs_plain']:.3f}" if "vs_plain" in row else "1.000"
        lines.append(f"| {row['name']} | {row['samples_per_s']:.0f} | {ratio} |")
    lines += ["", "| start-up | seconds |", "| --- | ---: |"]
    for name, seconds in r["startup_s"].items():
        lines.append(f"| `{name}` | {seconds:.2f} |")
    lines += [
        "",
        "| time to target | target | seconds | epochs | at the end |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for row in r["time_to_target"]:
        seconds = "not reached" if row["seconds"] is None else f"{row['seconds']:.1f}"
        lines.append(
            f"| {row['run']} | {row['target']} | {seconds} | {row['epochs'] or ''} | "
            f"{row['final_test']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
