"""What a run cost: training throughput, and memory and parameters per rank.

Both go into the manifest, so a benchmark (or a user comparing strategies)
reads them from the run directory.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


class Throughput(Callback):
    """Training samples per second of each epoch: from the epoch's first batch
    to its last, validation in between left out. Work at the epoch's edges
    (validation, checkpoints) is not training throughput and is not counted."""

    def __init__(self):
        self.epochs: list[float] = []
        self.first_step_unix: float | None = None  # wall clock of the first step
        self.epoch_end_unix: list[float] = []
        self._start: float | None = None
        self._last = 0.0
        self._paused = 0.0
        self._samples = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_step_unix is None:
            self.first_step_unix = time.time()
        if self._start is None:
            self._start, self._paused, self._samples = time.perf_counter(), 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += len(batch[1])
        self._last = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.training and self._start is not None:
            if self._val_start < self._last:  # validation inside the epoch
                self._paused += time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self._start is None:
            return
        seconds = self._last - self._start - self._paused
        # Samples seen by all data-parallel replicas (the stages of one pipeline
        # share their batch): this rank's count times the replicas.
        replicas = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
        count = self._samples * (replicas["num_replicas"] if replicas else 1)
        self.epochs.append(count / seconds if seconds > 0 else 0.0)
        self.epoch_end_unix.append(time.time())
        self._start = None

    def summary(self) -> dict[str, Any]:
        """Median over the epochs after the first (which warms up)."""
        steady = self.epochs[1:] or self.epochs
        return {
            "train_samples_per_s": round(statistics.median(steady), 1)
            if steady
            else None,
            "per_epoch": [round(v, 1) for v in self.epochs],
            "first_step_unix": self.first_step_unix,
            "epoch_end_unix": self.epoch_end_unix,
        }


def rank_resources(module: torch.nn.Module) -> dict[str, Any]:
    """This process's peak memory and the parameter bytes it holds (a shard
    under FSDP, its stages under a pipeline)."""
    held = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        held += local.numel() * local.element_size()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    info: dict[str, Any] = {"parameter_bytes": held, "peak_rss_mb": round(peak_mb, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        info["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return info


def gather(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (just ours without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
