"""Reading dltrain checkpoints safely, and checking they fit a config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHECKPOINT_KEY = "dltrain"


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A dltrain checkpoint, loaded without running code from it."""
    import torch

    from dltrain.trainers.errors import ConfigError

    if path.is_dir():
        raise ConfigError(f"--ckpt {path} is a folder; give a .ckpt file")
    if not path.is_file():
        raise ConfigError(f"--ckpt {path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        if "Unsupported global" in str(err) or "GLOBAL" in str(err):
            reason = "it holds objects that only pickled code could rebuild; refused"
        else:
            reason = "truncated, corrupt, or not a torch file"
        raise ConfigError(f"{path}: not a loadable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise ConfigError(
            f"{path}: not a dltrain checkpoint (no '{CHECKPOINT_KEY}' entry)"
        )
    return checkpoint


def check_model(checkpoint: dict[str, Any], wanted: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose model config differs from ``wanted``."""
    from dltrain.trainers.errors import ConfigError

    trained = checkpoint[CHECKPOINT_KEY]["config"]["model"]
    if trained != wanted:
        raise ConfigError(
            f"{path} holds a model={trained.get('name')} trained with {trained}, but "
            f"the config asks for model={wanted.get('name')} with {wanted}; evaluate "
            "the checkpoint with its own config: dltrain eval --ckpt FILE"
        )


# Keys a resume may change: how to train on, not what is trained.
RESUMABLE_CHANGES = ("trainer", "run", "checkpoint", "report", "sweep")


def check_resumable(
    run_dir: Path, cfg: Any, world_size: int | None = None
) -> tuple[Path, dict[str, Any]]:
    """The run's ``last.ckpt`` and its contents, checked to come from this config
    (and, for a pipeline, from this world size); raises ConfigError naming the
    difference.

    Called before the run folder is touched, and again by every rank."""
    from dltrain.trainers.errors import ConfigError
    from dltrain.trainers.rundir import config_changes

    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ConfigError(
            f"{run_dir} has no checkpoints/last.ckpt to resume from (it stopped "
            "before its first checkpoint); start it again with dltrain fit"
        )
    checkpoint = read_checkpoint(last)
    differs = config_changes(
        checkpoint[CHECKPOINT_KEY]["config"], cfg, RESUMABLE_CHANGES
    )
    if differs:
        raise ConfigError(
            f"{last} was written with another {', '.join(differs)} than {run_dir}/"
            "config.yaml; resume refuses a checkpoint of another run"
        )
    states = checkpoint.get("optimizer_states") or [{}]
    ranks = states[0].get("per_rank") if isinstance(states[0], dict) else None
    if world_size is not None and ranks is not None and len(ranks) != world_size:
        raise ConfigError(
            f"{last} holds the optimizer states of a pipeline on {len(ranks)} "
            f"processes, not {world_size}; resume it with trainer.devices x "
            f"trainer.num_nodes = {len(ranks)}"
        )
    return last, checkpoint
