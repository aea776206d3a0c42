"""``dltrain plan``: what a config would run, and how to launch it, without training.

The plan resolves the strategy, the world size and device mesh, measures the
pipeline's layer costs on this machine to show the stage split, and writes the
``torchrun`` and ``sbatch``/``srun`` lines that run the same config elsewhere.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dltrain.trainers.launch import check_data, launcher_env


def make_plan(cfg: DictConfig, argv: list[str]) -> dict[str, Any]:
    """The plan of ``cfg``; ``argv`` are the user's fit arguments (file, overrides)."""
    import torch

    check_data(cfg)
    from dltrain.trainers.run import build_datamodule, build_net, sample_inputs

    t, s = cfg.trainer, cfg.strategy
    env = launcher_env()
    nodes = t.num_nodes if env is None else env["world_size"] // env["devices"]
    per_node = t.devices if env is None else env["devices"]
    world = nodes * per_node
    info = build_datamodule(cfg).info
    net = build_net(cfg, info)
    params = sum(p.numel() for p in net.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    plan: dict[str, Any] = {
        "strategy": OmegaConf.to_container(s, enum_to_str=True),
        "model": cfg.model.name,
        "parameters": params,
        "data": cfg.data.name,
        "num_nodes": nodes,
        "processes_per_node": per_node,
        "world_size": world,
        "accelerator": t.accelerator.value,
        "precision": t.precision,
    }
    batch = cfg.data.batch_size
    if s.name == "pipeline":
        from dltrain.trainers.pipeline import (
            balance,
            bubble_fraction,
            describe_plan,
            layer_costs,
        )

        size = s.pipeline_size or world
        replicas = world // size
        stages = size * s.stages_per_rank
        layers = net.layers()
        micro = batch // s.microbatches
        costs = layer_costs(layers, sample_inputs(info, micro), s.balance.value)
        points = list(s.split_points) if s.split_points else balance(costs, stages)
        unit = "flops" if s.balance.value == "flops" else "ms"
        split = describe_plan([n for n, _ in layers], costs, points, unit, size)
        split["measured_on"] = f"this machine, one micro-batch of {micro}"
        bubble = bubble_fraction(s.schedule, size, s.microbatches, s.stages_per_rank)
        plan["mesh"] = {"dp": replicas, "pp": size}
        plan["pipeline"] = {
            **split,
            "schedule": s.schedule,
            "microbatches": s.microbatches,
            "microbatch_size": micro,
            "bubble_fraction": round(bubble, 4),
        }
    elif s.name == "fsdp":
        replicas = world
        plan["mesh"] = {"dp_shard": world}
        plan["fsdp"] = {
            "wrap": s.wrap.value,
            "parameter_bytes_unsharded": param_bytes,
            "parameter_bytes_per_rank": -(-param_bytes // world),
        }
    else:
        replicas = world
        plan["mesh"] = {"dp": world}
    plan["batch_per_replica"] = batch
    plan["global_batch"] = batch * replicas
    plan["gpus_visible_here"] = torch.cuda.device_count()
    plan["commands"] = launch_commands(cfg, argv, nodes, per_node)
    return plan


def launch_commands(
    cfg: DictConfig, argv: list[str], nodes: int, per_node: int
) -> dict[str, str]:
    """Shell lines that run ``dltrain fit ARGV`` on ``nodes`` x ``per_node``."""
    args = [
        a for a in argv if not a.startswith(("trainer.devices=", "trainer.num_nodes="))
    ]
    layout = [f"trainer.devices={per_node}", f"trainer.num_nodes={nodes}"]
    fit = shlex.join(["fit", *args, *layout])
    gpu = cfg.trainer.accelerator.value != "cpu"
    commands = {"here": f"dltrain {fit}" if nodes == 1 else ""}
    rdzv = "--rdzv-backend=c10d --rdzv-endpoint=$HEAD_NODE:29500 --rdzv-id=$JOB_ID"
    commands["torchrun"] = (
        f"torchrun --nnodes={nodes} --nproc-per-node={per_node} {rdzv} "
        f'"$(command -v dltrain)" {fit}'
    )
    gres = f" --gpus-per-node={per_node}" if gpu else ""
    script = Path("scripts") / "slurm.sbatch"
    commands["sbatch"] = (
        f"sbatch --nodes={nodes} --ntasks-per-node={per_node}{gres} {script} "
        + shlex.join([*args])
    ).rstrip()
    commands["srun"] = (
        f"srun --nodes={nodes} --ntasks-per-node={per_node}{gres} dltrain {fit}"
    )
    if not commands["here"]:
        del commands["here"]
    return commands


def render_plan(plan: dict[str, Any]) -> str:
    """The plan as the lines `dltrain plan` prints."""
    s = plan["strategy"]
    options = ", ".join(f"{k}={v}" for k, v in s.items() if k != "name")
    mesh = " x ".join(f"{k} {v}" for k, v in plan["mesh"].items())
    lines = [
        f"strategy   {s['name']}" + (f" ({options})" if options else ""),
        f"model      {plan['model']}, {plan['parameters']:,} parameters; "
        f"data {plan['data']}",
        f"world      {plan['world_size']} process(es): {plan['num_nodes']} node(s) x "
        f"{plan['processes_per_node']}, accelerator {plan['accelerator']}, "
        f"precision {plan['precision']}",
        f"mesh       {mesh}",
        f"batch      {plan['batch_per_replica']} per data-parallel replica, "
        f"{plan['global_batch']} per optimizer step",
    ]
    if "fsdp" in plan:
        f = plan["fsdp"]
        lines.append(
            f"sharding   {f['parameter_bytes_per_rank']:,} parameter bytes per rank "
            f"of {f['parameter_bytes_unsharded']:,} unsharded (wrap {f['wrap']})"
        )
    if "pipeline" in plan:
        p = plan["pipeline"]
        lines.append(
            f"pipeline   {len(p['stages'])} stages, schedule {p['schedule']}, "
            f"{p['microbatches']} micro-batches of {p['microbatch_size']}; "
            f"bubble {p['bubble_fraction']:.0%} of a step; split {p['split_points']} "
            f"(balance {p['balance']}, costs measured on {p['measured_on']})"
        )
        for stage in p["stages"]:
            lines.append(
                f"  stage {stage['stage']} on rank {stage['rank']}: "
                f"{', '.join(stage['layers'])}  {stage['cost']:.4g} {p['cost_unit']}"
            )
    lines.append("launch")
    lines += [f"  {name:8} {line}" for name, line in plan["commands"].items()]
    return "\n".join(lines)
