"""Pipeline parallelism on ``torch.distributed.pipelining``, inside Lightning.

Lightning has no pipeline strategy; this one is two parts:

- :class:`PipelineStrategy` lays the processes out on a 2D device mesh
  (``dp`` x ``pp``): each row of ``pp`` ranks is one pipeline, the rows are data
  parallel. It feeds each pipeline one shard of the data, gathers the stages'
  weights into one full checkpoint (the same keys as ``single``, so ``dltrain
  eval`` reads it with any strategy) and keeps each rank's optimizer state.
- :class:`PipelineModule` cuts the model's ``layers()`` into stages, balanced by
  a measured cost per layer unless ``split_points`` are given, and runs every
  batch through a schedule (GPipe, 1F1B, interleaved 1F1B) in micro-batches.

Batches are padded to ``data.batch_size`` (the stages exchange fixed shapes) with
targets that the loss ignores, and the loss is the sum over the real samples
divided by their number: the gradients are those of the unpadded batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torch.nn import functional as F

from dltrain.metrics.tasks import IGNORE
from dltrain.trainers.errors import ConfigError
from dltrain.trainers.module import LossDiverged, TaskModule

SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
}


# ---------------------------------------------------------------- stage split


def layer_costs(
    layers: Sequence[tuple[str, nn.Module]],
    sample: torch.Tensor,
    kind: str = "time",
    repeats: int = 10,
) -> list[float]:
    """Cost of a forward and backward pass of each layer on ``sample``.

    ``kind="time"``: the fastest of ``repeats`` timings in milliseconds, after
    two warm-ups (the minimum is what the layer costs; slower runs are noise
    from other processes);
    ``kind="flops"``: floating-point operations counted by PyTorch.
    """
    from torch.utils.flop_counter import FlopCounterMode

    costs = []
    x = sample
    for index, (_, layer) in enumerate(layers):
        # The model's own input needs no gradient; every activation after it does.
        inputs = x.detach().requires_grad_(index > 0 and x.is_floating_point())

        def run(
            layer: nn.Module = layer, inputs: torch.Tensor = inputs
        ) -> torch.Tensor:
            out = layer(inputs)
            if out.requires_grad:
                out.backward(torch.ones_like(out))
            return out

        if kind == "flops":
            with FlopCounterMode(display=False) as counter:
                out = run()
            costs.append(float(counter.get_total_flops()))
        else:
            run()
            out = run()  # warm-ups
            times = []
            for _ in range(repeats):
                _synchronize(sample.device)
                begin = time.perf_counter()
                run()
                _synchronize(sample.device)
                times.append((time.perf_counter() - begin) * 1e3)
            costs.append(min(times))
        for p in layer.parameters():
            p.grad = None
        x = out.detach()
    return costs


def balance(costs: Sequence[float], stages: int) -> list[int]:
    """Split points (first layer of stages 1..n-1) that make the costliest of
    ``stages`` contiguous, non-empty stages as cheap as possible."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} layers into {stages} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the least possible max stage cost for layers[:i] in s stages.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    points, i = [], n
    for s in range(stages, 1, -1):
        i = cut[s][i]
        points.append(i)
    return points[::-1]


def stage_ranges(n_layers: int, split_points: Sequence[int]) -> list[range]:
    bounds = [0, *split_points, n_layers]
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def describe_plan(
    names: Sequence[str],
    costs: Sequence[float],
    split_points: Sequence[int],
    unit: str,
    pipeline_size: int | None = None,
) -> dict[str, Any]:
    """The split as it goes into the manifest and the plan: layers, cost, rank."""
    ranges = stage_ranges(len(names), split_points)
    size = pipeline_size or len(ranges)
    stages = []
    for index, r in enumerate(ranges):
        stages.append(
            {
                "stage": index,
                "rank": index % size,
                "layers": [names[i] for i in r],
                "cost": round(sum(costs[i] for i in r), 6),
            }
        )
    total = sum(costs)
    slowest = max(s["cost"] for s in stages) if stages else 0.0
    return {
        "split_points": list(split_points),
        "cost_unit": unit,
        "stages": stages,
        # Of a perfect split (every stage total/n), how much the slowest reaches.
        "balance": round(total / (len(stages) * slowest), 3) if slowest else 1.0,
    }


def bubble_fraction(schedule: str, stages: int, microbatches: int, v: int = 1) -> float:
    """Idle share of a step for a pipeline of ``stages`` ranks: (p-1)/(m+p-1) for
    GPipe and 1F1B, (p-1)/(v*m+p-1) for interleaved 1F1B with v stages per rank."""
    p, m = stages, microbatches
    if schedule == "interleaved_1f1b":
        return (p - 1) / (v * m + p - 1)
    return (p - 1) / (m + p - 1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- strategy


class PipelineStrategy(DDPStrategy):
    """Process groups on a (data parallel x pipeline) mesh; no DDP wrapper.

    Data-parallel gradients are averaged by :class:`PipelineModule` after each
    schedule step, since a stage's backward runs inside the schedule.
    """

    def __init__(self, pipeline_size: int, process_group_backend: str | None = None):
        super().__init__(process_group_backend=process_group_backend)
        self.pipeline_size = pipeline_size
        self.mesh: Any = None

    def setup_environment(self) -> None:
        super().setup_environment()
        from torch.distributed.device_mesh import init_device_mesh

        if self.world_size % self.pipeline_size:
            raise ConfigError(
                f"strategy.pipeline_size={self.pipeline_size} does not divide the "
                f"world size {self.world_size}"
            )
        dp = self.world_size // self.pipeline_size
        self.mesh = init_device_mesh(
            self.root_device.type,
            (dp, self.pipeline_size),
            mesh_dim_names=("dp", "pp"),
        )

    def setup(self, trainer: pl.Trainer) -> None:
        # DDPStrategy.setup without the DDP wrapper, and without broadcasting
        # rank 0's weights: every rank holds different layers.
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            from lightning_fabric.utilities.optimizer import _optimizers_to_device

            _optimizers_to_device(self.optimizers, self.root_device)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        dp = self.mesh["dp"]
        return {"num_replicas": dp.size(), "rank": dp.get_local_rank()}

    def _gather_to_zero(self, part: Any) -> list[Any] | None:
        """Every rank's ``part`` on global rank 0 (``None`` elsewhere)."""
        parts = [None] * self.world_size if self.global_rank == 0 else None
        dist.gather_object(part, parts, dst=0)
        return parts

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full model on rank 0, assembled from the stages of pipeline 0."""
        assert self.lightning_module is not None
        own = {}
        if self.mesh["dp"].get_local_rank() == 0:
            own = _to_cpu(self.lightning_module.state_dict())
        parts = self._gather_to_zero(own)
        if parts is None:
            return {}
        return {k: v for part in parts for k, v in part.items()}

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        assert self.lightning_module is not None
        own = self.lightning_module.state_dict().keys()
        state = {k: v for k, v in checkpoint["state_dict"].items() if k in own}
        self.lightning_module.load_state_dict(state, strict=strict)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Rank 0 keeps every rank's optimizer state: each holds its own stages."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        parts = self._gather_to_zero(_to_cpu(optimizer.state_dict()))
        return {"per_rank": parts} if parts is not None else {}

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        for optimizer, saved in zip(
            self.optimizers, checkpoint["optimizer_states"], strict=False
        ):
            parts = saved.get("per_rank")
            if parts is None or len(parts) != self.world_size:
                found = "no pipeline state" if parts is None else f"{len(parts)} ranks"
                raise ConfigError(
                    f"the checkpoint's optimizer state ({found}) cannot be split "
                    f"over a pipeline of {self.world_size} processes; resume with the "
                    "strategy and devices it was saved with"
                )
            optimizer.load_state_dict(parts[self.global_rank])


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _Boundary(nn.Module):
    """The edge of a stage: tensors sent between stages (activations forward,
    gradients backward) must be contiguous; an LSTM's input gradient is not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point() and x.requires_grad:
            return _ContiguousGrad.apply(x)
        return x.contiguous()


def _to_cpu(value: Any) -> Any:
    return apply_to_collection(value, torch.Tensor, lambda t: t.detach().cpu())


# ---------------------------------------------------------------- module


class PipelineModule(TaskModule):
    """A :class:`TaskModule` whose model runs as pipeline stages.

    Args (besides TaskModule's):
        pipeline: the ``strategy`` config (schedule, microbatches, stages_per_rank,
            split_points, balance).
        batch_size: every batch is padded to this size.
        sample: a batch of inputs of one micro-batch, to measure layer costs.
        gradient_clip_val: clip the global gradient norm (across stages).
        on_plan: called on global rank 0 with the chosen split.
    """

    def __init__(
        self,
        *args: Any,
        pipeline: dict[str, Any],
        batch_size: int,
        sample: torch.Tensor,
        gradient_clip_val: float | None = None,
        on_plan: Callable[[dict[str, Any]], None] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.sample = sample
        self.gradient_clip_val = gradient_clip_val
        self.on_plan = on_plan
        self.plan: dict[str, Any] | None = None
        self._schedule: Any = None
        self._real = 1

    # -- building the stages

    def configure_model(self) -> None:
        if self._schedule is not None:
            return
        from torch.distributed import pipelining

        strategy = self.trainer.strategy
        pp = strategy.mesh["pp"]
        self._pp_group, self._dp_group = pp.get_group(), strategy.mesh["dp"].get_group()
        size, rank = pp.size(), pp.get_local_rank()
        per_rank = self.pipeline["stages_per_rank"]
        n_stages = size * per_rank
        layers = self.net.layers()

        self.plan = self._choose_split(layers, n_stages, size, strategy.root_device)
        ranges = stage_ranges(len(layers), self.plan["split_points"])
        mine = [rank + k * size for k in range(per_rank)]  # loop-style placement
        self._first, self._last = 0 in mine, n_stages - 1 in mine
        owned = {layers[i][0] for s in mine for i in ranges[s]}
        stages = [
            pipelining.PipelineStage(
                nn.Sequential(_Boundary(), *(layers[i][1] for i in ranges[s])),
                stage_index=s,
                num_stages=n_stages,
                device=strategy.root_device,
                group=self._pp_group,
            )
            for s in mine
        ]
        # This rank keeps only its own layers; the others' weights are freed.
        for name, _ in layers:
            if name not in owned:
                self.net.set_submodule(name, nn.Identity())
        schedule_class = getattr(pipelining, SCHEDULES[self.pipeline["schedule"]])
        self._schedule = schedule_class(
            stages if per_rank > 1 else stages[0],
            n_microbatches=self.pipeline["microbatches"],
            loss_fn=self._loss,
            scale_grads=False,  # the loss is already divided by the real samples
        )

    def _choose_split(
        self, layers, n_stages: int, size: int, device: torch.device
    ) -> dict[str, Any]:
        """Rank 0 measures (or takes the given split) and tells every rank."""
        box: list[Any] = [None]
        if dist.get_rank() == 0:
            kind = self.pipeline["balance"]
            net = self.net.to(device)
            costs = layer_costs(layers, self.sample.to(device), kind)
            points = self.pipeline["split_points"] or balance(costs, n_stages)
            unit = "flops" if kind == "flops" else "ms"
            box[0] = describe_plan(
                [name for name, _ in layers],
                costs,
                points,
                unit,
                size,
            )
            net.zero_grad(set_to_none=True)
            if self.on_plan is not None:
                self.on_plan(box[0])
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- one batch through the schedule

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(
            logits.float(), target, ignore_index=IGNORE, reduction="sum"
        )
        return loss / self._real

    def _pad(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._real = len(y)
        missing = self.batch_size - len(y)
        if missing > 0:
            x = torch.cat([x, x.new_zeros((missing, *x.shape[1:]))])
            y = torch.cat([y, y.new_full((missing,), IGNORE)])
        return x, y

    def _run(self, x: torch.Tensor, y: torch.Tensor, train: bool) -> Any:
        x, y = self._pad(x, y)
        args = (x,) if self._first else ()
        target = y if self._last else None
        losses: list[torch.Tensor] = []
        if train:
            self._schedule.step(
                *args, target=target, losses=losses, return_outputs=False
            )
            return torch.stack(losses).sum() if self._last else None
        return self._schedule.eval(*args, target=target, losses=losses)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = self._run(x, y, train=True)
        # The loss lives on the last stage; every rank logs it and stops on NaN.
        total = torch.zeros((), device=self.device)
        if loss is not None:
            total += loss.detach()
        dist.all_reduce(total, group=self._pp_group)
        if not torch.isfinite(total):
            raise LossDiverged(
                f"the training loss became {total.item()} at step {self.global_step} "
                f"(epoch {self.current_epoch + 1}); lower optim.lr (now "
                f"{self.optim['lr']}) or set trainer.gradient_clip_val"
            )
        params = [p for p in self.parameters() if p.requires_grad]
        self._average_over_replicas(params)
        if self.gradient_clip_val:
            self._clip(params, self.gradient_clip_val)
        optimizer.step()
        self.track_train_loss(total, len(y), batch_idx)

    def _average_over_replicas(self, params: list[torch.Tensor]) -> None:
        replicas = dist.get_world_size(self._dp_group)
        if replicas == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self._dp_group)
            p.grad.div_(replicas)

    def _clip(self, params: list[torch.Tensor], max_norm: float) -> None:
        """Clip by the norm of the whole model's gradient, summed over stages."""
        squares = torch.zeros((), device=self.device)
        for p in params:
            if p.grad is not None:
                squares += p.grad.detach().float().pow(2).sum()
        dist.all_reduce(squares, group=self._pp_group)
        scale = max_norm / (squares.sqrt() + 1e-6)
        if scale < 1:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)

    def predict_batch(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._run(x, y, train=False)
        if not self._last:  # only the last stage has logits; the others log nothing
            return torch.zeros(0, self.num_classes, device=self.device), y[:0]
        return out[: len(y)].float(), y

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["pipeline_split"] = self.plan["split_points"] if self.plan else None
