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
