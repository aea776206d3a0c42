"""The Lightning strategy for ``cfg.strategy``, and how each one parallelizes a model.

``single`` and ``ddp`` are Lightning's own. ``fsdp`` is FSDP2
(``torch.distributed.fsdp.fully_shard``) applied in ``configure_model`` through
Lightning's ``ModelParallelStrategy`` (its ``FSDPStrategy`` refuses CPUs).
``pipeline`` is ours, on ``torch.distributed.pipelining``: see
:mod:`dltrain.trainers.pipeline`.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn


def build_strategy(cfg: DictConfig) -> Any:
    """The strategy object (or name) that ``pl.Trainer(strategy=...)`` takes."""
    s = cfg.strategy
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    if s.name == "ddp":
        return DDPStrategy(
            process_group_backend=s.backend,
            find_unused_parameters=s.find_unused_parameters,
        )
    if s.name == "fsdp":
        return ModelParallelStrategy(
            data_parallel_size=world,
            tensor_parallel_size=1,
            # One full checkpoint file on rank 0: eval reads it on any device count.
            save_distributed_checkpoint=False,
            process_group_backend=s.backend,
        )
    if s.name == "pipeline":
        from dltrain.trainers.pipeline import PipelineStrategy

        return PipelineStrategy(
            pipeline_size=s.pipeline_size or world, process_group_backend=s.backend
        )
    return "auto"


def shard(net: nn.Module, mesh: Any, options: DictConfig, on_gpu: bool) -> None:
    """Apply FSDP2 to ``net`` in place, unit by unit as ``options.wrap`` says."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
    )

    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": options.reshard_after_forward,
    }
    if options.mixed_precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if options.cpu_offload and on_gpu:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    units = _units(net, options.wrap.value)
    if options.activation_checkpointing:
        _checkpoint_activations(net, units)
        units = _units(net, options.wrap.value)
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(net, **kwargs)


def _units(net: nn.Module, wrap: str) -> list[nn.Module]:
    if wrap == "model":
        return []
    if wrap == "blocks":
        return list(net.blocks())
    return [m for m in net.modules() if m is not net and _has_own_parameters(m)]


def _has_own_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _checkpoint_activations(net: nn.Module, units: list[nn.Module]) -> None:
    """Recompute each block's activations in backward instead of keeping them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    targets = set(map(id, units or net.blocks()))
    apply_activation_checkpointing(net, check_fn=lambda m: id(m) in targets)
