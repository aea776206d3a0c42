"""The run directory: its name, its resolved config and its manifest.

Torch-free, so the CLI can make and check run directories cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dltrain.trainers.errors import ConfigError
from dltrain.trainers.schema import validate

CONFIG = "config.yaml"
MANIFEST = "manifest.json"
REPORT = "report.json"
PACKAGES = (
    "dltrain",
    "torch",
    "pytorch-lightning",
    "torchmetrics",
    "hydra-core",
    "numpy",
)


def new_run_dir(cfg: DictConfig) -> Path:
    """``run.dir`` if set, else ``<run.root>/<name>_<time>``; refuses to reuse a run."""
    if cfg.run.dir:
        path = Path(cfg.run.dir).expanduser()
        if (path / CONFIG).exists():
            raise ConfigError(
                f"run.dir={path} already holds a run; choose another run.dir "
                "(or leave it unset for a fresh timestamped folder)"
            )
        if path.is_dir() and any(path.iterdir()):
            raise ConfigError(
                f"run.dir={path} is a folder with other files in it; choose a new "
                "or empty folder"
            )
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = (
            Path(cfg.run.root).expanduser()
            / f"{cfg.run.name or cfg.experiment}_{stamp}"
        )
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    return make_folder(path)


def make_folder(path: Path) -> Path:
    """Create a run folder (and its parents); a failure names run.dir and the cause."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"run.dir={path}: cannot create it ({err.strerror})"
        ) from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"run.dir={path} is not writable; choose another run.dir")
    return path.resolve()


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename: never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def write_run(
    run_dir: Path, cfg: DictConfig, overrides: list[str], world_size: int, job: str
) -> dict[str, Any]:
    """Write the resolved ``config.yaml`` and the manifest of a new run."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    (run_dir / CONFIG).write_text(text)
    manifest = {
        "job": job,
        "status": "running",
        "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "overrides": overrides,
        "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "seed": cfg.seed,
        "strategy": cfg.strategy.name,
        "world_size": world_size,
        "devices": cfg.trainer.devices,
        "num_nodes": cfg.trainer.num_nodes,
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in PACKAGES},
        "git_commit": _git_commit(),
    }
    write_json(run_dir / MANIFEST, manifest)
    return manifest


def resume_run(
    run_dir: Path, cfg: DictConfig, overrides: list[str], world_size: int
) -> None:
    """Record a resume in the manifest; ``config.yaml`` takes the new trainer values."""
    (run_dir / CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    manifest = read_manifest(run_dir)
    resumes = manifest.get("resumes", [])
    resumes.append(
        {
            "at": finished_at(),
            "overrides": overrides,
            "after": manifest["status"],
            "world_size": world_size,
        }
    )
    manifest.update(
        status="running",
        resumes=resumes,
        world_size=world_size,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
    )
    write_json(run_dir / MANIFEST, manifest)


def auto_resume(cfg: DictConfig) -> tuple[str, Path | None]:
    """What ``run.resume=auto`` does with ``run.dir``: "fresh" (no run there yet),
    "resume" (a run with a checkpoint), "restart" (a run that died before its
    first checkpoint: it starts over in place) or "finished" (nothing left to do).

    A run there with another model, data or strategy is refused.
    """
    if cfg.run.resume != "auto":
        return "fresh", None
    path = Path(cfg.run.dir).expanduser().resolve()
    if not (path / CONFIG).is_file():
        return "fresh", None
    saved = load_config(path)
    differs = config_changes(
        OmegaConf.to_container(saved, resolve=True, enum_to_str=True),
        cfg,
        allowed=("trainer", "run", "sweep"),
    )
    if differs:
        raise ConfigError(
            f"run.dir={path} holds a run with another {', '.join(differs)}; "
            "run.resume=auto continues only the same experiment: choose another "
            "run.dir, or drop run.resume=auto"
        )
    if not (path / "checkpoints" / "last.ckpt").is_file():
        return "restart", path
    manifest = read_manifest(path)
    if (
        manifest.get("status") == "finished"
        and cfg.trainer.max_epochs <= saved.trainer.max_epochs
    ):
        return "finished", path
    return "resume", path


def config_changes(
    saved: dict[str, Any], cfg: DictConfig, allowed: tuple[str, ...]
) -> list[str]:
    """Top-level keys of ``cfg`` whose values differ from ``saved``, except
    ``allowed`` ones: what would make a run another experiment."""
    current = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return [k for k in current if k not in allowed and saved.get(k) != current[k]]


_LOCKS: list[int] = []  # folders this process holds, for its lifetime


def lock_folder(path: Path) -> None:
    """Hold ``path`` for this process: a second dltrain on the same run.dir (a
    requeued job overlapping its predecessor) is refused instead of mixing files."""
    import fcntl

    make_folder(path)
    fd = os.open(path, os.O_RDONLY)  # not inherited by the workers
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"run.dir={path} is in use by another dltrain process; wait for it to "
            "end, or choose another run.dir"
        ) from None
    _LOCKS.append(fd)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is missing: {run_dir} is not a complete dltrain run"
        ) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{path} is not valid JSON ({err}); restore it or start a new run"
        ) from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"{path} is not a dltrain manifest (not a mapping)")
    return manifest


def update_manifest(run_dir: Path, **fields: Any) -> None:
    manifest = read_manifest(run_dir)
    manifest.update(fields)
    write_json(run_dir / MANIFEST, manifest)


def load_config(run_dir: Path) -> DictConfig:
    """The validated config of an existing run directory."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} is not a dltrain run: it has no {CONFIG}; "
            "give a folder made by `dltrain fit` (or --ckpt FILE)"
        )
    try:
        saved = OmegaConf.load(path)
    except Exception as err:  # yaml and OmegaConf raise several types
        first = (
            str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        )
        raise ConfigError(f"{path} is not a readable config ({first})") from None
    if not isinstance(saved, DictConfig):
        raise ConfigError(f"{path} is not a dltrain config (not a mapping)")
    return validate(saved)


def finished_at() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The commit of the git checkout the run started in, if any."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def elapsed(start: float) -> str:
    return f"{time.monotonic() - start:.1f} s"
