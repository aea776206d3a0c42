"""LightningDataModules for images (digits, MNIST) and character-level text.

Splits are made once, deterministically from the seed (stratified for
classification). Training batches are drawn by a seeded sampler that shards
across ranks; validation and test are sharded without padding, so that every
sample is counted exactly once whatever the number of processes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
    TensorDataset,
)

from dltrain.data.readers import (
    DataError,
    ImageSet,
    read_text,
    text_min_chars,
)
from dltrain.data.splits import split_indices


@dataclass
class DataInfo:
    """What a model and a report need to know about a data set."""

    task: str  # "classification" or "language_model"
    num_classes: int
    source: str
    input_shape: tuple[int, ...] = ()  # (C, H, W) for images, (window,) for text
    class_names: list[str] = field(default_factory=list)
    vocab: str = ""
    sizes: dict[str, int] = field(default_factory=dict)


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ...: every sample once, no padding."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochSampler(Sampler[int]):
    """A fresh seeded draw of ``num_samples`` indices each epoch, sharded by rank.

    Every rank gets the same number of indices, so DDP ranks run the same
    number of steps.
    """

    def __init__(
        self, length: int, num_samples: int, seed: int, rank: int, world_size: int
    ):
        if length <= 0:
            raise ValueError("EpochSampler needs a data set of at least one sample")
        self.length = length
        self.per_rank = max(1, num_samples // world_size)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        # Permutations are drawn one at a time, so a large num_samples costs no memory.
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.per_rank * self.world_size
        position = 0
        while position < total:
            chunk = torch.randperm(self.length, generator=generator)[: total - position]
            first = (self.rank - position) % self.world_size
            yield from chunk[first :: self.world_size].tolist()
            position += len(chunk)

    def __len__(self) -> int:
        return self.per_rank


class ResumableSampler(Sampler[int]):
    """A training sampler that, in an epoch resumed from a checkpoint written
    mid-epoch, skips the batches already trained on: the rest of the epoch sees
    exactly the samples an uninterrupted run would have seen."""

    def __init__(self, sampler: Sampler, batch_size: int, batches_done):
        self.sampler = sampler
        self.batch_size = batch_size
        self.batches_done = batches_done

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        # Called at the epoch's first batch, after Lightning restored its counters.
        return itertools.islice(
            iter(self.sampler), self.batches_done() * self.batch_size, None
        )

    def __len__(self) -> int:
        return len(self.sampler)


class _ShardedDataModule(pl.LightningDataModule):
    """Loaders shared by both data modules; subclasses fill the three splits."""

    train_set: Dataset
    val_set: Dataset
    test_set: Dataset

    def __init__(
        self, batch_size: int, num_workers: int, seed: int, pin_memory: bool = False
    ):
        super().__init__()
        self.eval_split = "test"  # what `trainer.test` evaluates: "test" or "val"
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        # Data-parallel replicas: the stages of one pipeline share a shard.
        replicas = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None)
        if replicas:
            return replicas["rank"], replicas["num_replicas"]
        return self.trainer.global_rank, self.trainer.world_size

    def _loader(self, dataset: Dataset, sampler: Sampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            # Its own seed stream: starting an epoch's iterator never draws from
            # the global one, so a run resumed mid-epoch draws what it would have.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _batches_done(self) -> int:
        """Batches of the current epoch already trained (non-zero after a resume)."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.current.completed

    def train_sampler(self) -> Sampler:
        rank, world = self._rank_world()
        return DistributedSampler(
            self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed
        )

    def train_dataloader(self) -> DataLoader:
        sampler = ResumableSampler(
            self.train_sampler(), self.batch_size, self._batches_done
        )
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(
            self.val_set, ShardSampler(len(self.val_set), *self._rank_world())
        )

    def test_dataloader(self) -> DataLoader:
        dataset = self.val_set if self.eval_split == "val" else self.test_set
        return self._loader(dataset, ShardSampler(len(dataset), *self._rank_world()))


class ImageDataModule(_ShardedDataModule):
    """Digits or MNIST: stratified train/val/test splits of one labelled set."""

    def __init__(
        self,
        images: ImageSet,
        batch_size: int,
        val_fraction: float,
        test_fraction: float,
        seed: int,
        num_workers: int = 0,
        fold: int | None = None,
        folds: int | None = None,
        pin_memory: bool = False,
    ):
        super().__init__(batch_size, num_workers, seed, pin_memory)
        train, val, test = split_indices(
            images.labels, val_fraction, test_fraction, seed, fold, folds, images.source
        )
        x = torch.from_numpy(images.images)
        y = torch.from_numpy(images.labels)
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])
        num_classes = int(images.labels.max()) + 1
        self.info = DataInfo(
            task="classification",
            num_classes=num_classes,
            source=images.source,
            input_shape=tuple(images.images.shape[1:]),
            class_names=[str(c) for c in range(num_classes)],
            sizes={"train": len(train), "val": len(val), "test": len(test)},
        )


class WindowDataset(Dataset):
    """Windows of ``window`` characters and the character that follows each."""

    def __init__(self, tokens: torch.Tensor, window: int, stride: int = 1):
        self.tokens, self.window, self.stride = tokens, window, stride
        self.count = max(0, (len(tokens) - window - 1) // stride + 1)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.stride
        return self.tokens[start : start + self.window], self.tokens[
            start + self.window
        ]


class TextDataModule(_ShardedDataModule):
    """Character-level language modelling: contiguous train/val/test parts."""

    def __init__(
        self,
        path: str | None,
        window: int,
        train_samples: int,
        eval_stride: int,
        batch_size: int,
        val_fraction: float,
        test_fraction: float,
        seed: int,
        num_workers: int = 0,
        vocab: str | None = None,
        pin_memory: bool = False,
    ):
        super().__init__(batch_size, num_workers, seed, pin_memory)
        min_chars = text_min_chars(window, val_fraction, test_fraction)
        text, source = read_text(Path(path) if path else None, min_chars)
        if vocab is None:
            vocab = "".join(sorted(set(text)))
        lookup = {ch: i for i, ch in enumerate(vocab)}
        unknown = sorted(set(text) - lookup.keys())
        if unknown:
            raise DataError(
                f"{source} holds {len(unknown)} characters the model has never seen "
                f"(e.g. {unknown[0]!r}); evaluate on text with the training vocabulary"
            )
        tokens = torch.tensor([lookup[ch] for ch in text], dtype=torch.long)
        n_val, n_test = int(len(text) * val_fraction), int(len(text) * test_fraction)
        n_train = len(text) - n_val - n_test
        self.train_set = WindowDataset(tokens[:n_train], window)
        self.val_set = WindowDataset(
            tokens[n_train : n_train + n_val], window, eval_stride
        )
        self.test_set = WindowDataset(tokens[n_train + n_val :], window, eval_stride)
        self.train_samples = train_samples
        self.info = DataInfo(
            task="language_model",
            num_classes=len(vocab),
            source=source,
            input_shape=(window,),
            vocab=vocab,
            sizes={
                "train": train_samples,
                "val": len(self.val_set),
                "test": len(self.test_set),
            },
        )

    def train_sampler(self) -> Sampler:
        rank, world = self._rank_world()
        return EpochSampler(
            len(self.train_set), self.train_samples, self.seed, rank, world
        )
