"""The LightningModule that trains any of the plain models on either task."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from dltrain.metrics.tasks import CLASSIFICATION, build_metrics, update_metrics
from dltrain.trainers.checkpoint import CHECKPOINT_KEY


class LossDiverged(RuntimeError):
    """The loss is NaN or infinite: training cannot go on meaningfully."""


class TaskModule(pl.LightningModule):
    """Cross-entropy training of ``net``; torchmetrics for validation and test.

    Args:
        net: a plain ``nn.Module`` mapping a batch of inputs to logits.
        task: "classification" or "language_model".
        num_classes: classes, or the vocabulary size.
        optim: optimizer name, lr, weight_decay and scheduler.
        max_epochs: horizon of the cosine schedule.
        checkpoint_meta: stored in every checkpoint, so a checkpoint alone can
            rebuild its model and data (config, vocabulary).
    """

    def __init__(
        self,
        net: nn.Module,
        task: str,
        num_classes: int,
        optim: dict[str, Any],
        max_epochs: int,
        checkpoint_meta: dict[str, Any],
        top_k: int = 5,
        calibration_bins: int = 15,
    ):
        super().__init__()
        self.net = net
        self.task = task
        self.optim = optim
        self.max_epochs = max_epochs
        self.checkpoint_meta = checkpoint_meta
        self._loss_sum: torch.Tensor | None = None  # this epoch, this rank
        self._loss_count = 0
        self.val_loss = MeanMetric()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_metrics = build_metrics(task, num_classes, top_k, calibration_bins)
        self.test_values: dict[str, Any] = {}
        self.num_classes = num_classes
        self._test_batches = 0
        # Set by a strategy that shards or cuts the model (see configure_model).
        self.parallelize: Callable[[TaskModule], None] | None = None
        self._parallelized = False

    @property
    def monitor(self) -> tuple[str, str]:
        """The validation metric that picks the best checkpoint, and its mode."""
        return (
            ("val_acc", "max") if self.task == CLASSIFICATION else ("val_loss", "min")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_model(self) -> None:
        """Strategies that shard the model (FSDP) do it here, once per module."""
        if self.parallelize is not None and not self._parallelized:
            self.parallelize(self)
            self._parallelized = True

    def predict_batch(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (float) and the targets they belong to, for the metrics."""
        return self(x).float(), y

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if not torch.isfinite(loss):
            # Stop before this step updates the weights or any checkpoint is written.
            raise LossDiverged(
                f"the training loss became {loss.item()} at step {self.global_step} "
                f"(epoch {self.current_epoch + 1}); lower optim.lr (now "
                f"{self.optim['lr']}) or set trainer.gradient_clip_val"
            )
        self.track_train_loss(loss, len(y), batch_idx)
        return loss

    def track_train_loss(self, loss: torch.Tensor, size: int, batch_idx: int) -> None:
        """Sum the step losses of the epoch; log them sparingly.

        Lightning's ``self.log`` costs about a millisecond a call, which was 13%
        of a step of the default CNN: the step value goes to the log every
        ``trainer.log_every_n_steps`` steps only, and the epoch mean (summed over
        every rank with one all-reduce) once, on the epoch's last batch.
        """
        value = loss.detach().float()
        if self._loss_sum is None:
            self._loss_sum = torch.zeros((), device=value.device)
        self._loss_sum += value * size
        self._loss_count += size
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train_loss_step", value, prog_bar=True, batch_size=size)
        if batch_idx + 1 < self.trainer.num_training_batches:
            return
        totals = torch.stack(
            [self._loss_sum, torch.tensor(float(self._loss_count), device=value.device)]
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        self.log("train_loss", totals[0] / totals[1], on_step=False, on_epoch=True)
        self._loss_sum, self._loss_count = None, 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        logits, y = self.predict_batch(*batch)
        if len(y):  # a pipeline stage before the last has no logits, only logs
            self.val_loss.update(F.cross_entropy(logits, y, reduction="none"))
            self.val_acc.update(logits, y)
        size = len(batch[1])
        self.log(
            "val_loss", self.val_loss, on_epoch=True, prog_bar=True, batch_size=size
        )
        self.log("val_acc", self.val_acc, on_epoch=True, prog_bar=True, batch_size=size)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        update_metrics(self.test_metrics, *self.predict_batch(*batch))
        self._test_batches += 1

    def on_test_epoch_end(self) -> None:
        # compute() gathers the states of every rank (torchmetrics' own sync).
        if self._test_batches == 0:  # no shard for this rank: join the sync anyway
            empty = torch.zeros(0, self.num_classes, device=self.device)
            update_metrics(self.test_metrics, empty, torch.zeros(0, dtype=torch.long))
        self._test_batches = 0
        self.test_values = _to_cpu(self.test_metrics.compute())
        self.test_metrics.reset()

    def configure_optimizers(self):
        name, lr, decay = (
            self.optim["name"],
            self.optim["lr"],
            self.optim["weight_decay"],
        )
        if name == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(), lr=lr, momentum=0.9, weight_decay=decay
            )
        elif name == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=decay)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=decay)
        if self.optim["scheduler"] != "cosine":
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=self.max_epochs
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.checkpoint_meta
        # Every rank's random streams (dropout), so a resumed run draws what an
        # uninterrupted one would have drawn. All ranks dump; rank 0 writes.
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        states = [state]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
        checkpoint["rng"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng")
        if not states:
            return
        if len(states) != self.trainer.world_size:
            return  # another world size: the streams cannot be matched rank to rank
        state = states[self.trainer.global_rank]
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _to_cpu(value: Any) -> Any:
    """Metric results (tensors, or tuples and lists of them for curves) on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
