"""Stopping, saving and restarting safely: signals, step checkpoints, atomic writes.

- :class:`StopSignals` turns SIGINT, SIGTERM and SIGUSR1 into a stop at the
  next training step that every rank agrees on, after writing ``last.ckpt``.
  (Lightning's own SIGTERM handler broadcasts from inside the signal handler; a
  rank caught in another collective then deadlocks. Ours only records the
  signal; the agreement is an all-reduce at a step boundary, where every rank is.)
- :class:`StepCheckpoint` refreshes ``last.ckpt`` every N training steps.
- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file and
  renames it: a process killed while saving leaves the previous file intact.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback

from dltrain.trainers.errors import ConfigError, Stopped

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopSignals(Callback):
    """Record a stop signal; stop at the next step boundary all ranks agree on.

    A second Ctrl-C interrupts at once. ``last`` is the checkpoint written
    before stopping, so ``dltrain fit --resume`` continues from that very step.
    """

    def __init__(self, last: Path):
        self.last = last
        self.requested = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = self.requested or signum

    def _install(self, *args: Any) -> None:
        # Again at train start: Lightning installs its SIGTERM handler in between.
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            previous = signal.signal(sig, self._handle)
            # Restart interrupted system calls: a signal landing in a gloo
            # send or receive must not fail it on one rank only.
            signal.siginterrupt(sig, False)
            self._previous.setdefault(sig, previous)

    def _restore(self, *args: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    on_fit_start = _install
    on_train_start = _install
    on_test_start = _install
    on_test_end = _restore

    def _agree(self, trainer: pl.Trainer) -> int:
        signum = self.requested
        if trainer.world_size > 1:
            flag = torch.tensor([signum], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        # A signal after the last training step: stop before the test, together.
        signum = self._agree(trainer)
        self._restore()
        if signum:
            raise Stopped(signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._agree(trainer)
        if not signum:
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            # The epoch's last step: its validation has not run yet. Stopping here
            # would save an epoch without it, and a resume would never validate it
            # (nor pick it as best): stop once it has run, at the epoch's end.
            self.requested = signum
            return
        trainer.save_checkpoint(self.last)  # every rank: sharded states gather
        raise Stopped(signum)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        # After the epoch's validation (and its checkpoints): a signal that came
        # at its last step or during validation stops here, on every rank.
        signum = self._agree(trainer)
        if signum:
            trainer.save_checkpoint(self.last)
            raise Stopped(signum)

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        # The test has nothing to save (a resume tests again): one process stops
        # now; several stop together at the fit's end or the next training step.
        if self.requested and trainer.world_size == 1:
            raise Stopped(self.requested)


class StepCheckpoint(Callback):
    """Write ``last`` every ``every`` training steps (a resume continues from it)."""

    def __init__(self, last: Path, every: int):
        self.last = last
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step and trainer.global_step % self.every == 0:
            trainer.save_checkpoint(self.last)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same folder, fsync, then rename."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:
            # torch's zip writer reports a short write as a RuntimeError.
            if isinstance(err, OSError):
                reason = err.strerror or str(err)
            elif "unexpected pos" in str(err) or "file write failed" in str(err):
                reason = "the file could not be written in full: is the disk full?"
            else:
                raise
            tmp.unlink(missing_ok=True)
            kept = (
                f"the previous {path.name} is intact" if path.exists() else "none kept"
            )
            raise ConfigError(
                f"cannot write the checkpoint {path} ({reason}); {kept}. "
                "Free space or fix permissions there, then continue with "
                f"dltrain fit --resume {path.parent.parent}"
            ) from None
