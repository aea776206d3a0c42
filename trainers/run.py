"""One run inside one process: data, model, trainer, fit, test, report.

Every rank of a run executes :func:`execute` on the same run directory and
reads the same ``config.yaml``; only global rank 0 writes shared files.
"""

from __future__ import annotations

import csv
import functools
import logging
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from dltrain.data.datamodules import DataInfo, ImageDataModule, TextDataModule
from dltrain.data.readers import load_digits, load_mnist
from dltrain.metrics.render import to_markdown
from dltrain.metrics.tasks import CLASSIFICATION, summarize
from dltrain.models.cnn import CNN
from dltrain.models.rnn import BiRNN
from dltrain.trainers import rundir
from dltrain.trainers.checkpoint import (
    CHECKPOINT_KEY,
    check_model,
    check_resumable,
    read_checkpoint,
)
from dltrain.trainers.errors import ConfigError
from dltrain.trainers.faults import AtomicCheckpointIO, StepCheckpoint, StopSignals
from dltrain.trainers.launch import _interruption
from dltrain.trainers.loggers import Tracking
from dltrain.trainers.logs import debug_requested, quiet_libraries
from dltrain.trainers.measure import Throughput, gather, rank_resources
from dltrain.trainers.module import TaskModule
from dltrain.trainers.progress import progress_callbacks
from dltrain.trainers.strategies import build_strategy

log = logging.getLogger(__name__)

# Strategies whose fitted module no longer holds the whole model on every rank.
RESHAPING = ("fsdp", "pipeline")
quiet_libraries(debug_requested())  # again: importing Lightning reset its levels

# With num_workers=0 (the default here: the data sets are in memory) Lightning
# suggests more workers on every run; that advice does not apply.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
# The report notes a class without positives itself; torchmetrics' warning repeats it.
warnings.filterwarnings(
    "ignore", message=r".*No (positive|negative) samples in targets.*"
)
# A pipeline stage before the last never updates the validation metrics it syncs.
warnings.filterwarnings("ignore", message=r".*compute.* was called before .*update.*")
# Resumed mid-epoch: the training sampler skips what was done (ResumableSampler).
warnings.filterwarnings(
    "ignore", message=r".*resuming from a checkpoint that ended before.*"
)
# FSDP2 warns that an LSTM returns views; its gradients match DDP's (tested).
warnings.filterwarnings("ignore", message=r".*returned a view tensor.*")
# Lightning's hint when an epoch has fewer steps than log_every_n_steps: harmless.
warnings.filterwarnings("ignore", message=r".*log_every_n_steps.*")
# A resumed run keeps its own CSV log (see execute), whatever the logger says.
warnings.filterwarnings("ignore", message=r".*Experiment logs directory .* exists.*")
warnings.filterwarnings(
    "ignore", message=r".*Checkpoint directory .* exists and is not empty.*"
)
# Lightning 2.6 calls a torch pytree API that newer torch deprecates; not ours to fix.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def build_datamodule(
    cfg: DictConfig, vocab: str | None = None
) -> pl.LightningDataModule:
    """The datamodule of ``cfg.data``; ``vocab`` pins a trained model's alphabet."""
    data = cfg.data
    if data.name == "text":
        return TextDataModule(
            path=data.path,
            window=data.window,
            train_samples=data.train_samples,
            eval_stride=data.eval_stride,
            batch_size=data.batch_size,
            val_fraction=data.val_fraction,
            test_fraction=data.test_fraction,
            seed=cfg.seed,
            num_workers=data.num_workers,
            vocab=vocab,
            pin_memory=data.pin_memory,
        )
    images = load_digits() if data.name == "digits" else load_mnist(Path(data.root))
    return ImageDataModule(
        images,
        batch_size=data.batch_size,
        val_fraction=data.val_fraction,
        test_fraction=data.test_fraction,
        seed=cfg.seed,
        num_workers=data.num_workers,
        fold=data.fold,
        folds=data.folds,
        pin_memory=data.pin_memory,
    )


def build_net(cfg: DictConfig, info: DataInfo) -> torch.nn.Module:
    """The plain model of ``cfg.model``, sized for the data."""
    model = cfg.model
    if model.name == "cnn":
        return CNN(
            info.input_shape,
            info.num_classes,
            channels=tuple(model.channels),
            hidden=model.hidden,
            dropout=model.dropout,
        )
    text = info.task == "language_model"
    return BiRNN(
        info.num_classes,
        vocab_size=info.num_classes if text else None,
        row_width=None if text else info.input_shape[-1],
        cell=model.cell.value,
        embed_dim=model.embed_dim,
        hidden_size=model.hidden_size,
        num_layers=model.num_layers,
        dropout=model.dropout,
    )


def build_module(
    cfg: DictConfig,
    info: DataInfo,
    run_dir: Path | None = None,
    split: list[int] | None = None,
) -> TaskModule:
    """The LightningModule for ``cfg``; ``split`` pins a pipeline's cut (a resumed
    or tested pipeline keeps the one it trained with)."""
    try:
        net = build_net(cfg, info)
    except RuntimeError as err:  # e.g. a hidden size that does not fit in memory
        if "alloc" not in str(err):
            raise
        model = OmegaConf.to_container(cfg.model, enum_to_str=True)
        raise ConfigError(
            f"the model {model} does not fit in memory; use smaller model sizes"
        ) from None
    meta = {
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "data": asdict(info),
    }
    common = {
        "task": info.task,
        "num_classes": info.num_classes,
        "optim": OmegaConf.to_container(cfg.optim, enum_to_str=True),
        "max_epochs": cfg.trainer.max_epochs,
        "checkpoint_meta": meta,
        "top_k": cfg.report.top_k,
        "calibration_bins": cfg.report.calibration_bins,
    }
    name = cfg.strategy.name
    if name == "pipeline":
        from dltrain.trainers.pipeline import PipelineModule

        pipe = OmegaConf.to_container(cfg.strategy, enum_to_str=True)
        if split:
            pipe["split_points"] = list(split)
        micro = max(1, cfg.data.batch_size // pipe["microbatches"])
        return PipelineModule(
            net,
            **common,
            pipeline=pipe,
            batch_size=cfg.data.batch_size,
            sample=sample_inputs(info, micro),
            gradient_clip_val=cfg.trainer.gradient_clip_val,
            on_plan=functools.partial(_record_plan, cfg, run_dir) if run_dir else None,
        )
    if cfg.trainer.compile:
        net.compile()  # in place: the state dict keeps its keys
    module = TaskModule(net, **common)
    if name == "fsdp":
        from dltrain.trainers.strategies import shard

        on_gpu = cfg.trainer.accelerator.value != "cpu" and torch.cuda.is_available()
        module.parallelize = lambda m: shard(
            m.net, m.device_mesh["data_parallel"], cfg.strategy, on_gpu
        )
    return module


def sample_inputs(info: DataInfo, size: int) -> torch.Tensor:
    """A random batch shaped like the data's inputs (to measure layer costs)."""
    generator = torch.Generator().manual_seed(0)
    if info.task == "language_model":
        return torch.randint(
            0, info.num_classes, (size, *info.input_shape), generator=generator
        )
    return torch.randn((size, *info.input_shape), generator=generator)


def _record_plan(cfg: DictConfig, run_dir: Path | None, plan: dict[str, Any]) -> None:
    """Global rank 0: say how the pipeline was cut and keep it in the manifest."""
    unit = plan["cost_unit"]
    parts = [
        f"stage {s['stage']} (rank {s['rank']}) {s['layers'][0]}..{s['layers'][-1]} "
        f"{s['cost']:.3g} {unit}"
        for s in plan["stages"]
    ]
    how = (
        "given"
        if cfg.strategy.split_points
        else f"balanced by {cfg.strategy.balance.value}"
    )
    print(
        f"pipeline: split {plan['split_points']} ({how}, balance {plan['balance']}): "
        + "; ".join(parts),
        file=sys.stderr,
        flush=True,
    )
    if run_dir is not None and (run_dir / rundir.MANIFEST).is_file():
        rundir.update_manifest(run_dir, pipeline=plan)


def build_trainer(
    cfg: DictConfig, run_dir: Path, monitor: tuple[str, str], log: bool = True
) -> pl.Trainer:
    """A Lightning Trainer for the configured strategy, logging into ``run_dir``
    (``log=False`` for an evaluation, which has no training curve)."""
    t = cfg.trainer
    pipeline = cfg.strategy.name == "pipeline"
    folder = run_dir / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=folder,
        filename="best",
        monitor=monitor[0],
        mode=monitor[1],
        save_top_k=1,
        every_n_epochs=cfg.checkpoint.every_n_epochs,
        enable_version_counter=False,
    )
    # Lightning's save_last writes last.ckpt only when a best one is saved; this
    # one writes it at the end of every (Nth) epoch, improved or not.
    last = ModelCheckpoint(
        dirpath=folder,
        filename="last",
        monitor=None,
        save_top_k=1,
        every_n_epochs=cfg.checkpoint.every_n_epochs,
        save_on_train_epoch_end=True,
        enable_version_counter=False,  # last.ckpt is also written by StepCheckpoint
    )
    progress = progress_callbacks(t.progress.value)
    safety = [StopSignals(folder / "last.ckpt")]
    if cfg.checkpoint.keep:
        safety.append(
            ModelCheckpoint(
                dirpath=folder,
                filename="epoch-{epoch:04d}",
                monitor="epoch",  # the most recent K epochs
                mode="max",
                save_top_k=cfg.checkpoint.keep,
                every_n_epochs=cfg.checkpoint.every_n_epochs,
                auto_insert_metric_name=False,
                enable_version_counter=False,
            )
        )
    if cfg.checkpoint.every_n_steps:
        safety.append(
            StepCheckpoint(folder / "last.ckpt", cfg.checkpoint.every_n_steps)
        )
    return pl.Trainer(
        accelerator=t.accelerator.value,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg),
        precision=t.precision,
        max_epochs=t.max_epochs,
        deterministic=t.deterministic,
        # The pipeline steps its optimizer itself, and clips across its stages.
        gradient_clip_val=None if pipeline else t.gradient_clip_val,
        # Its stages' receive buffers are reused by training: no inference tensors.
        inference_mode=not pipeline,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        logger=CSVLogger(save_dir=run_dir, name="logs", version="") if log else False,
        callbacks=[checkpoint, last, *safety, *progress],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=any(not hasattr(c, "every_s") for c in progress),
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=run_dir,
    )


def load_weights(module: TaskModule, checkpoint: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's weights, naming the mismatch if its model differs."""
    check_model(checkpoint, module.checkpoint_meta["config"]["model"], path)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"{path}: its weights do not fit this model ({first})"
        ) from None


def execute(
    run_dir: Path, job: str, ckpt: Path | None = None, resume: bool = False
) -> dict[str, Any]:
    """Fit (``job="fit"``) or evaluate (``job="eval"``) the run in ``run_dir``.

    Returns the report; global rank 0 has also written report.json and report.md.
    """
    start = time.monotonic()
    cfg = rundir.load_config(run_dir)
    checkpoint = read_checkpoint(ckpt) if ckpt else None
    vocab = checkpoint[CHECKPOINT_KEY]["data"]["vocab"] if checkpoint else None

    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = build_datamodule(cfg, vocab=vocab or None)
    info = datamodule.info
    last, saved = (
        check_resumable(run_dir, cfg) if job == "fit" and resume else (None, {})
    )
    # A resumed pipeline keeps the cut its optimizer states were saved with.
    split = saved.get("pipeline_split") if cfg.strategy.name == "pipeline" else None
    module = build_module(cfg, info, run_dir, split)  # the same weights on every rank
    trainer = build_trainer(cfg, run_dir, module.monitor, log=job == "fit")
    torch.manual_seed(rank_seed(cfg.seed, trainer.global_rank))
    if job == "fit" and info.sizes["val"] < trainer.world_size:
        # Lightning syncs logged validation metrics; a rank without batches would hang.
        raise ConfigError(
            f"the validation split holds {info.sizes['val']} samples, fewer than the "
            f"{trainer.world_size} processes; raise data.val_fraction or use fewer devices"
        )
    say = _rank_zero_printer(trainer)
    say(
        f"{job}: model={cfg.model.name} ({_count(module):,} parameters), data={cfg.data.name} "
        f"(train {info.sizes['train']}, val {info.sizes['val']}, test {info.sizes['test']}), "
        f"strategy={cfg.strategy.name}, world size {trainer.world_size}"
    )

    # TensorBoard or MLflow beside the CSV log, on rank 0; a resume continues them.
    tracking = Tracking.start(
        cfg,
        run_dir,
        rank_zero=trainer.is_global_zero and job == "fit",
        resumed_step=saved["global_step"] if last is not None else None,
    )
    trainer.loggers = [*trainer.loggers, *tracking.loggers]

    try:
        if job == "fit":
            if last is not None:
                say(f"fit: resuming from {last.name}")
                # Lightning's CSV logger starts its file anew: keep the rows up to
                # the checkpoint, and put them back in front once fit is done.
                done = saved["epoch"]
                history = [r for r in _csv_rows(run_dir) if int(r["epoch"]) <= done]
            throughput = Throughput()
            trainer.callbacks.append(throughput)
            trainer.fit(
                module, datamodule=datamodule, ckpt_path=last, weights_only=True
            )
            step = trainer.global_step
            ranks = gather(rank_resources(module))
            if trainer.is_global_zero:
                rundir.update_manifest(
                    run_dir, throughput=throughput.summary(), ranks=ranks
                )
            if last is not None and trainer.is_global_zero:
                _write_csv_rows(run_dir, history + _csv_rows(run_dir))
            callback = trainer.checkpoint_callback
            best = callback.best_model_path
            if cfg.data.get("folds"):  # cv: the held-out fold must not pick the model
                best = ""
            ckpt = Path(best) if best else run_dir / "checkpoints" / "last.ckpt"
            checkpoint = read_checkpoint(ckpt)
            say(f"fit: done in {rundir.elapsed(start)}; testing {ckpt.name}")
            if cfg.strategy.name in RESHAPING:
                # The fitted module is sharded or cut into stages: test a fresh one
                # with the checkpoint's full weights, on a fresh trainer.
                plan = getattr(module, "plan", None)
                module = build_module(cfg, info, split=plan and plan["split_points"])
                trainer = build_trainer(cfg, run_dir, module.monitor, log=False)
        load_weights(module, checkpoint, ckpt)

        report = evaluate(
            trainer, module, datamodule, cfg, "test", run_dir, ckpt, start
        )
        if job == "fit":
            tracking.log_report(report, step)
        if cfg.data.get("folds"):  # cross-validation: also score the held-out fold
            datamodule.eval_split = "val"
            evaluate(trainer, module, datamodule, cfg, "val", run_dir, ckpt, start)
    except BaseException as err:
        tracking.close("KILLED" if _interruption(err) else "FAILED")
        raise
    tracking.close("FINISHED")
    return report


def rank_seed(seed: int, rank: int) -> int:
    """The seed of one rank's random stream (dropout) after the model is built:
    ranks draw different masks, and the same seed and rank draw the same ones."""
    import numpy as np

    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _csv_rows(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _write_csv_rows(run_dir: Path, rows: list[dict[str, str]]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path = run_dir / "logs" / "metrics.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def evaluate(
    trainer: pl.Trainer,
    module: TaskModule,
    datamodule: pl.LightningDataModule,
    cfg: DictConfig,
    split: str,
    run_dir: Path,
    ckpt: Path,
    start: float,
) -> dict[str, Any]:
    """Test ``module`` on one split; rank 0 writes the report files and plots."""
    info = datamodule.info
    began = time.perf_counter()
    trainer.test(module, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - began
    report = {
        "task": info.task,
        "split": split,
        **summarize(module.test_values, info.task, info.class_names),
        "top_k": min(cfg.report.top_k, info.num_classes),
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt),
        "data": info.source,
        "model": cfg.model.name,
        "strategy": cfg.strategy.name,
        "world_size": trainer.world_size,
        "seconds": round(time.monotonic() - start, 1),
        # The whole test phase: loading, forward passes, metrics and their sync.
        "test_samples_per_s": round(
            info.sizes["val" if split == "val" else "test"] / test_seconds, 1
        ),
    }
    if not trainer.is_global_zero:
        return report
    if split != "test":
        rundir.write_json(run_dir / f"report_{split}.json", report)
        return report
    plots = {}
    if cfg.report.plots:
        plots = draw_plots(report, module.test_values, run_dir, module.monitor[0])
    rundir.write_json(run_dir / rundir.REPORT, report)
    (run_dir / "report.md").write_text(to_markdown(report, plots))
    return report


def draw_plots(
    report: dict[str, Any], values: dict[str, Any], run_dir: Path, main_metric: str
) -> dict[str, str]:
    """PNG plots in ``run_dir/plots``; returns title -> path relative to run_dir."""
    from dltrain.metrics import plots

    folder = run_dir / "plots"
    drawn: dict[str, Path | None] = {}
    if report["task"] == CLASSIFICATION:
        names = [row["class"] for row in report["per_class"]]
        aurocs = {row["class"]: row["auroc"] for row in report["per_class"]}
        drawn["confusion matrix"] = plots.plot_confusion(
            report["confusion_matrix"], names, folder / "confusion_matrix.png"
        )
        drawn["ROC curves"] = plots.plot_roc(
            values["roc"], names, aurocs, folder / "roc.png"
        )
    history = _history_csv(run_dir)
    drawn["training history"] = plots.plot_history(
        history, main_metric, folder / "history.png"
    )
    return {
        title: str(path.relative_to(run_dir))
        for title, path in drawn.items()
        if path is not None
    }


def _history_csv(run_dir: Path) -> Path:
    """The CSV log of the fit this run comes from (an eval folder sits inside it)."""
    for folder in (run_dir, *run_dir.parents[:2]):
        if (folder / "logs" / "metrics.csv").is_file():
            return folder / "logs" / "metrics.csv"
    return run_dir / "logs" / "metrics.csv"


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _rank_zero_printer(trainer: pl.Trainer):
    def say(text: str) -> None:
        if trainer.is_global_zero:
            print(text, file=sys.stderr, flush=True)

    return say
