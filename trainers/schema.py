"""The typed schema of a composed config, checked before anything starts.

Only OmegaConf is imported here, so the CLI can validate a config without
importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from dltrain.trainers.errors import ConfigError


class Cell(Enum):
    rnn = "rnn"
    lstm = "lstm"
    gru = "gru"


class Accelerator(Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


class Progress(Enum):
    auto = "auto"
    rich = "rich"
    plain = "plain"
    none = "none"


class Optimizer(Enum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


class Scheduler(Enum):
    none = "none"
    cosine = "cosine"


PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true", "64-true")


@dataclass
class CNNConfig:
    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [32, 64])
    hidden: int = 128
    dropout: float = 0.25


@dataclass
class RNNConfig:
    name: str = "rnn"
    cell: Cell = Cell.lstm
    embed_dim: int = 32
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.0


@dataclass
class DigitsConfig:
    name: str = "digits"
    batch_size: int = 64
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    num_workers: int = 0
    pin_memory: bool = False
    fold: int | None = None
    folds: int | None = None


@dataclass
class MNISTConfig:
    name: str = "mnist"
    root: str | None = None
    batch_size: int = 128
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    num_workers: int = 0
    pin_memory: bool = False
    fold: int | None = None
    folds: int | None = None


@dataclass
class TextConfig:
    name: str = "text"
    path: str | None = None
    window: int = 32
    train_samples: int = 100000
    eval_stride: int = 4
    batch_size: int = 256
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    num_workers: int = 0
    pin_memory: bool = False


@dataclass
class SingleConfig:
    name: str = "single"


@dataclass
class DDPConfig:
    name: str = "ddp"
    backend: str | None = None
    find_unused_parameters: bool = False


class Wrap(Enum):
    model = "model"
    blocks = "blocks"
    layers = "layers"


SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


class Balance(Enum):
    time = "time"
    flops = "flops"


@dataclass
class FSDPConfig:
    name: str = "fsdp"
    backend: str | None = None
    wrap: Wrap = Wrap.blocks
    reshard_after_forward: bool = True
    mixed_precision: str | None = None
    cpu_offload: bool = False
    activation_checkpointing: bool = False


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    backend: str | None = None
    schedule: str = "1f1b"
    microbatches: int = 4
    pipeline_size: int | None = None
    stages_per_rank: int = 1
    split_points: list[int] | None = None
    balance: Balance = Balance.time


# How many layers each model offers a pipeline to cut between (its layers()).
PIPELINE_LAYERS = {"cnn": 11, "rnn": 4}


@dataclass
class TrainerConfig:
    accelerator: Accelerator = Accelerator.auto
    devices: int = 1
    num_nodes: int = 1
    max_epochs: int = 10
    precision: str = "32-true"
    deterministic: bool = False
    gradient_clip_val: float | None = None
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None
    log_every_n_steps: int = 10
    progress: Progress = Progress.auto
    compile: bool = False


@dataclass
class OptimConfig:
    name: Optimizer = Optimizer.adamw
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: Scheduler = Scheduler.none


@dataclass
class ReportConfig:
    top_k: int = 5
    calibration_bins: int = 15
    plots: bool = True


@dataclass
class RunConfig:
    dir: str | None = None
    name: str | None = None
    root: str = "runs"
    resume: str = "never"
    max_restarts: int = 0


@dataclass
class CheckpointConfig:
    every_n_epochs: int = 1
    every_n_steps: int | None = None
    keep: int = 0


@dataclass
class CSVLoggerConfig:
    name: str = "csv"


@dataclass
class TensorBoardLoggerConfig:
    name: str = "tensorboard"


@dataclass
class MLflowLoggerConfig:
    name: str = "mlflow"
    tracking_uri: str | None = None
    experiment_name: str | None = None


class SweepMode(Enum):
    auto = "auto"
    max = "max"
    min = "min"


class Launcher(Enum):
    local = "local"
    slurm = "slurm"
    submitit_local = "submitit_local"


@dataclass
class SlurmConfig:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    timeout_min: int = 60
    cpus_per_task: int = 4
    mem_gb: int | None = None


@dataclass
class SweepConfig:
    metric: str | None = None
    mode: SweepMode = SweepMode.auto
    max_parallel: int | None = None
    dir: str | None = None
    root: str = "sweeps"
    launcher: Launcher = Launcher.local
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class Config:
    experiment: str = "default"
    seed: int = 42
    model: Any = None
    data: Any = None
    strategy: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logger: Any = None
    sweep: SweepConfig = field(default_factory=SweepConfig)


GROUPS: dict[str, dict[str, type]] = {
    "model": {"cnn": CNNConfig, "rnn": RNNConfig},
    "data": {"digits": DigitsConfig, "mnist": MNISTConfig, "text": TextConfig},
    "strategy": {
        "single": SingleConfig,
        "ddp": DDPConfig,
        "fsdp": FSDPConfig,
        "pipeline": PipelineConfig,
    },
    "logger": {
        "csv": CSVLoggerConfig,
        "tensorboard": TensorBoardLoggerConfig,
        "mlflow": MLflowLoggerConfig,
    },
}


def validate(cfg: DictConfig) -> DictConfig:
    """Check a composed config against the schema; return it typed and read-only.

    Raises:
        ConfigError: naming the key, the value and the fix.
    """
    # Keys added at the top with +key=value are kept as the user's own notes.
    known = set(Config.__dataclass_fields__)
    extras = {k: cfg[k] for k in cfg if k not in known}
    core = OmegaConf.masked_copy(cfg, [k for k in cfg if k in known])
    typed = _merge(OmegaConf.structured(Config), core, "")
    for group, options in GROUPS.items():
        node = cfg.get(group)
        if node is None and group == "logger":  # a run saved before loggers were chosen
            node = OmegaConf.create({"name": "csv"})
        name = node.get("name") if isinstance(node, DictConfig) else node
        if name not in options:
            raise ConfigError(
                f"{group}={name!r} is not a known {group}; "
                f"choose one of: {', '.join(options)}"
            )
        typed[group] = _merge(OmegaConf.structured(options[name]), node, group + ".")
    _check_values(typed)
    if extras:
        with open_dict(typed):
            for key, value in extras.items():
                typed[key] = value
    OmegaConf.set_readonly(typed, True)
    return typed


def _merge(schema: DictConfig, node: Any, prefix: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, node)
    except OmegaConfBaseException as err:
        key = prefix + str(getattr(err, "full_key", "") or "")
        msg = str(getattr(err, "msg", err)).splitlines()[0]
        if isinstance(err, ConfigKeyError):
            raise ConfigError(
                f"unknown config key {key!r}; check the spelling with "
                "`dltrain config show`"
            ) from None
        raise ConfigError(f"invalid config at {key or 'top level'}: {msg}") from None


def _check_values(cfg: DictConfig) -> None:
    def positive(key: str, value: Any, fix: str = "") -> None:
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be positive{fix}")

    def fraction(key: str, value: float) -> None:
        if not 0.0 < value < 1.0:
            raise ConfigError(f"{key}={value} must be between 0 and 1, e.g. {key}=0.1")

    trainer = cfg.trainer
    if trainer.precision not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision={trainer.precision!r} is not supported; "
            f"choose one of: {', '.join(PRECISIONS)}"
        )
    for key in ("devices", "num_nodes", "max_epochs", "log_every_n_steps"):
        positive(f"trainer.{key}", trainer[key])
    for key in ("limit_train_batches", "limit_val_batches"):
        positive(f"trainer.{key}", trainer[key])
    positive("optim.lr", cfg.optim.lr)
    positive("sweep.max_parallel", cfg.sweep.max_parallel)
    positive("sweep.slurm.timeout_min", cfg.sweep.slurm.timeout_min)
    positive("sweep.slurm.cpus_per_task", cfg.sweep.slurm.cpus_per_task)
    for key in ("lr", "weight_decay"):
        if not math.isfinite(cfg.optim[key]) or cfg.optim[key] < 0:
            raise ConfigError(
                f"optim.{key}={cfg.optim[key]} must be a finite number >= 0"
            )
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed} must be between 0 and 2**32 - 1")
    if trainer.gradient_clip_val is not None and trainer.gradient_clip_val <= 0:
        raise ConfigError(
            f"trainer.gradient_clip_val={trainer.gradient_clip_val} must be positive "
            "(or null for no clipping)"
        )
    for key in ("experiment", "run.name"):
        name = OmegaConf.select(cfg, key)
        if name is not None and (
            "/" in name or "\\" in name or name in ("", ".", "..")
        ):
            raise ConfigError(
                f"{key}={name!r} names the run folder; use a plain name without "
                "slashes (run.dir=PATH puts a run anywhere)"
            )
    positive("checkpoint.every_n_epochs", cfg.checkpoint.every_n_epochs)
    positive("checkpoint.every_n_steps", cfg.checkpoint.every_n_steps)
    if cfg.checkpoint.keep < 0:
        raise ConfigError(
            f"checkpoint.keep={cfg.checkpoint.keep} must be >= 0 (epoch snapshots "
            "kept besides last.ckpt and best.ckpt; 0 keeps none)"
        )
    if cfg.run.resume not in ("never", "auto"):
        raise ConfigError(
            f"run.resume={cfg.run.resume!r} must be never or auto (auto: continue "
            "the run in run.dir from its last checkpoint if there is one)"
        )
    if cfg.run.resume == "auto" and not cfg.run.dir:
        raise ConfigError(
            "run.resume=auto needs run.dir: the folder a requeued or restarted job "
            "continues in, e.g. run.dir=runs/my-job"
        )
    if cfg.run.max_restarts < 0:
        raise ConfigError(f"run.max_restarts={cfg.run.max_restarts} must be >= 0")
    positive("report.top_k", cfg.report.top_k)
    positive("report.calibration_bins", cfg.report.calibration_bins)
    if cfg.data.get("folds") is not None:
        if cfg.data.folds < 2:
            raise ConfigError(f"data.folds={cfg.data.folds} must be at least 2")
        if cfg.data.fold is None or not 0 <= cfg.data.fold < cfg.data.folds:
            raise ConfigError(
                f"data.fold={cfg.data.fold} must be a fold index from 0 to "
                f"{cfg.data.folds - 1}"
            )
    positive("data.batch_size", cfg.data.batch_size)
    fraction("data.val_fraction", cfg.data.val_fraction)
    fraction("data.test_fraction", cfg.data.test_fraction)
    if cfg.data.val_fraction + cfg.data.test_fraction >= 0.9:
        raise ConfigError(
            "data.val_fraction + data.test_fraction must leave at least 10% for "
            f"training; got {cfg.data.val_fraction} + {cfg.data.test_fraction}"
        )
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be >= 0")
    if cfg.data.name == "text":
        positive("data.window", cfg.data.window)
        positive("data.train_samples", cfg.data.train_samples)
        positive("data.eval_stride", cfg.data.eval_stride)
    if cfg.model.name == "cnn":
        if cfg.data.name == "text":
            raise ConfigError(
                "model=cnn reads images and cannot model data=text; "
                "use model=rnn for text"
            )
        if len(cfg.model.channels) != 2:
            raise ConfigError(
                f"model.channels={list(cfg.model.channels)} must list the filters "
                "of the two conv blocks, e.g. model.channels=[32,64]"
            )
        for value in cfg.model.channels:
            positive("model.channels", value)
        positive("model.hidden", cfg.model.hidden)
    else:
        for key in ("embed_dim", "hidden_size", "num_layers"):
            positive(f"model.{key}", cfg.model[key])
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout={cfg.model.dropout} must be in [0, 1)")
    world = trainer.devices * trainer.num_nodes
    from dltrain.trainers.launch import launcher_env

    launched = launcher_env()
    if launched is not None and launched["world_size"] > 1:
        world = launched["world_size"]  # torchrun/srun decide; preflight compares
    if cfg.strategy.name == "single" and trainer.devices * trainer.num_nodes > 1:
        raise ConfigError(
            f"strategy=single runs one process, but trainer.devices={trainer.devices} "
            f"and trainer.num_nodes={trainer.num_nodes} ask for "
            f"{trainer.devices * trainer.num_nodes}; "
            "add strategy=ddp, or set trainer.devices=1"
        )
    if cfg.strategy.get("backend") not in (None, "gloo", "nccl"):
        raise ConfigError(
            f"strategy.backend={cfg.strategy.backend!r} is not supported; "
            "choose gloo, nccl or null (nccl on GPU, gloo on CPU)"
        )
    if trainer.compile and cfg.strategy.name in ("fsdp", "pipeline"):
        raise ConfigError(
            f"trainer.compile=true is not supported with strategy={cfg.strategy.name} "
            "(its wrapped modules or stages are not compiled); use it with single or ddp"
        )
    supported = {"fsdp": PRECISIONS[:4], "pipeline": ("32-true", "bf16-mixed")}
    allowed = supported.get(cfg.strategy.name, PRECISIONS)
    if trainer.precision not in allowed:
        raise ConfigError(
            f"trainer.precision={trainer.precision} is not supported with "
            f"strategy={cfg.strategy.name}; choose one of: {', '.join(allowed)}"
        )
    if cfg.strategy.name == "fsdp":
        _check_fsdp(cfg)
    if cfg.strategy.name == "pipeline":
        check_pipeline(cfg, world)


def _check_fsdp(cfg: DictConfig) -> None:
    fsdp = cfg.strategy
    if fsdp.mixed_precision not in (None, "bf16"):
        raise ConfigError(
            f"strategy.mixed_precision={fsdp.mixed_precision!r} is not supported; "
            "choose bf16 or null (full precision)"
        )
    if fsdp.mixed_precision and cfg.trainer.precision != "32-true":
        raise ConfigError(
            f"strategy.mixed_precision={fsdp.mixed_precision} and trainer.precision="
            f"{cfg.trainer.precision} both set a precision; keep one (FSDP's is "
            "strategy.mixed_precision, with trainer.precision=32-true)"
        )


def check_pipeline(cfg: DictConfig, world: int) -> None:
    """Checks of a pipeline layout that would otherwise hang or fail in a worker."""
    pipe, model = cfg.strategy, cfg.model.name
    if world < 2:
        raise ConfigError(
            f"strategy=pipeline cuts the model into stages on different processes, "
            f"but trainer.devices={cfg.trainer.devices} and trainer.num_nodes="
            f"{cfg.trainer.num_nodes} make {world}; set trainer.devices=2 (or more), "
            "or use strategy=single"
        )
    size = world if pipe.pipeline_size is None else pipe.pipeline_size
    if size < 2 or world % size:
        raise ConfigError(
            f"strategy.pipeline_size={pipe.pipeline_size} must be at least 2 and divide "
            f"the world size {world} (the rest is data parallel); e.g. "
            f"strategy.pipeline_size={world}"
        )
    if pipe.schedule not in SCHEDULES:
        raise ConfigError(
            f"strategy.schedule={pipe.schedule!r} is not a known schedule; "
            f"choose one of: {', '.join(SCHEDULES)}"
        )
    interleaved = pipe.schedule == "interleaved_1f1b"
    if pipe.stages_per_rank < 1 or (pipe.stages_per_rank > 1) != interleaved:
        want = "2 or more" if interleaved else "1"
        raise ConfigError(
            f"strategy.stages_per_rank={pipe.stages_per_rank} does not fit "
            f"strategy.schedule={pipe.schedule}; it needs {want}"
            + ("" if interleaved else " (or strategy.schedule=interleaved_1f1b)")
        )
    stages = size * pipe.stages_per_rank
    layers = PIPELINE_LAYERS[model]
    if stages > layers:
        raise ConfigError(
            f"the pipeline has {stages} stages (strategy.pipeline_size={size} x "
            f"strategy.stages_per_rank={pipe.stages_per_rank}) but model={model} has "
            f"only {layers} layers; use fewer devices or stages per rank"
        )
    n = pipe.microbatches
    if n < 1 or n > cfg.data.batch_size:
        raise ConfigError(
            f"strategy.microbatches={n} must be between 1 and data.batch_size="
            f"{cfg.data.batch_size} (every micro-batch holds at least one sample)"
        )
    if cfg.data.batch_size % n:
        raise ConfigError(
            f"strategy.microbatches={n} must divide data.batch_size="
            f"{cfg.data.batch_size} (the stages exchange micro-batches of one size)"
        )
    if pipe.schedule == "1f1b" and n < size:
        raise ConfigError(
            f"strategy.schedule=1f1b needs at least as many micro-batches as stages: "
            f"strategy.microbatches={n} < {size}; set strategy.microbatches={size} "
            "or more, or strategy.schedule=gpipe"
        )
    if interleaved and n % size:
        raise ConfigError(
            f"strategy.schedule=interleaved_1f1b needs strategy.microbatches to be a "
            f"multiple of strategy.pipeline_size={size}; got {n}"
        )
    points = pipe.split_points
    if points is not None:
        points = list(points)
        valid = all(0 < p < layers for p in points) and points == sorted(set(points))
        if len(points) != stages - 1 or not valid:
            raise ConfigError(
                f"strategy.split_points={points} must list {stages - 1} increasing "
                f"layer indices between 1 and {layers - 1} (the first layer of every "
                f"stage but the first; model={model} has {layers}), e.g. strategy.split_points="
                f"{_even_split(layers, stages)}; or null to balance by measured cost"
            )


def _even_split(layers: int, stages: int) -> list[int]:
    return [round(i * layers / stages) for i in range(1, stages)]
