"""Progress display: Lightning's rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, RichProgressBar


class PlainProgress(Callback):
    """One line per epoch, and one at most every ``every_s`` seconds within it.

    Meant for cluster logs, where a redrawn bar becomes thousands of lines.
    Lines go to stderr, from global rank 0 only.
    """

    def __init__(self, every_s: float = 30.0):
        self.every_s = every_s
        self._epoch_start = self._last = 0.0

    def _print(self, trainer: pl.Trainer, text: str) -> None:
        if trainer.is_global_zero:
            print(text, file=sys.stderr, flush=True)

    def on_train_epoch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        self._epoch_start = self._last = time.monotonic()

    # A run resumed mid-epoch starts without on_train_epoch_start.
    on_train_start = on_train_epoch_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        total = trainer.num_training_batches
        loss = trainer.callback_metrics.get("train_loss_step")
        loss_text = f" train_loss {float(loss):.4f}" if loss is not None else ""
        self._print(
            trainer,
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
            f"batch {batch_idx + 1}/{total}{loss_text}",
        )

    def on_train_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        metrics = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        for key in ("train_loss", "val_loss", "val_acc"):
            if key in metrics:
                parts.append(f"{key} {float(metrics[key]):.4f}")
        parts.append(f"({time.monotonic() - self._epoch_start:.1f} s)")
        self._print(trainer, "  ".join(parts))


def progress_callbacks(mode: str) -> list[Callback]:
    """The progress callbacks for ``trainer.progress`` (auto, rich, plain, none)."""
    if mode == "auto":
        mode = "rich" if sys.stderr.isatty() else "plain"
    if mode == "rich":
        return [RichProgressBar(console_kwargs={"stderr": True})]
    if mode == "plain":
        return [PlainProgress()]
    return []
