"""Starting the processes of a run.

Three cases, one rule: every rank reads the same run directory.

- One process: the run executes here.
- Several processes on this machine, no launcher around us: the run directory
  is made here, then PyTorch's elastic agent (the engine behind ``torchrun``)
  starts the workers with ``python -m dltrain.trainers.worker RUN_DIR``. The
  user's command line is never re-run.
- Under ``torchrun`` or ``srun`` the processes already exist: rank 0 makes the
  run directory and broadcasts its path; the world size comes from the launcher.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from dltrain.trainers import rundir
from dltrain.trainers.errors import ConfigError, LauncherError, Stopped
from dltrain.trainers.loggers import check as check_logger

log = logging.getLogger(__name__)


class WorkersFailed(Exception):
    """A worker process failed; ``exitcode`` is the failing rank's exit code."""

    def __init__(self, message: str, exitcode: int):
        super().__init__(message)
        self.exitcode = exitcode


class Interrupted(Exception):
    """The run was stopped by a signal (Ctrl-C, SIGTERM); ``signum`` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _interruption(err: BaseException) -> str | None:
    """A description if ``err`` means the user or the cluster stopped the run."""
    if isinstance(err, (Stopped, Interrupted)):
        return str(err)
    if isinstance(err, KeyboardInterrupt):
        return "interrupted by SIGINT"
    # Lightning turns Ctrl-C into SystemExit(1) after its own clean-up.
    if isinstance(err, SystemExit) and isinstance(err.__context__, KeyboardInterrupt):
        return "interrupted by SIGINT"
    if type(err).__name__ == "SIGTERMException":  # Lightning's, at a step boundary
        return "interrupted by SIGTERM"
    if type(err).__name__ == "SignalException":  # the elastic agent's
        return f"interrupted by {signal.Signals(_signal_number(err)).name}"
    return None


def _signal_number(err: BaseException) -> int:
    if isinstance(err, (Stopped, Interrupted)):
        return err.signum
    if type(err).__name__ == "SIGTERMException":
        return int(signal.SIGTERM)
    return int(getattr(err, "sigval", signal.SIGINT))


def launcher_env() -> dict[str, int] | None:
    """World layout set by an external launcher (torchrun or srun), if any.

    Raises ConfigError for variables that contradict each other (a rank beyond
    the world size, say): they would leave the processes waiting for peers.
    """
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or (
        "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env
    ):
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local = _env_int("LOCAL_WORLD_SIZE", 1, default=world)
        local_rank = _env_int("LOCAL_RANK", 0, default=0)
        if rank >= world or world % local or local_rank >= local:
            raise LauncherError(
                f"the launcher's variables contradict each other: RANK={rank}, "
                f"WORLD_SIZE={world}, LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE="
                f"{local}; start dltrain with torchrun, or unset them"
            )
        return {"rank": rank, "world_size": world, "devices": local}
    if "SLURM_NTASKS" in env and _env_int("SLURM_NTASKS", 1) > 1:
        world = _env_int("SLURM_NTASKS", 1)
        nodes = _env_int("SLURM_NNODES", 1, default=1)
        if "SLURM_PROCID" not in env:
            raise LauncherError(
                f"SLURM_NTASKS={world} but no SLURM_PROCID: this is not an srun "
                "task; start dltrain with srun (one task per process), or with "
                "SLURM_NTASKS unset"
            )
        rank = _env_int("SLURM_PROCID", 0)
        if rank >= world:
            raise LauncherError(
                f"SLURM_PROCID={rank} but SLURM_NTASKS={world}: the srun variables "
                "contradict each other; start dltrain with srun"
            )
        return {"rank": rank, "world_size": world, "devices": max(1, world // nodes)}
    return None


def _env_int(name: str, minimum: int, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    try:
        value = int(text or "")
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise LauncherError(
            f"the environment variable {name}={text!r} must be an integer >= "
            f"{minimum} (set by torchrun or srun); start dltrain with them, or unset it"
        )
    return value


def preflight(cfg: DictConfig) -> DictConfig:
    """Checks that need torch or the data: devices, precision, readable data.

    Under an external launcher the device count and node count come from it.
    Returns the config to run. The data is checked first: it needs no torch.
    """
    env = launcher_env()
    _check_slurm_layout()
    if env is not None and env["world_size"] > 1:
        _check_launcher_layout(cfg, env)
        if cfg.strategy.name == "single":
            raise ConfigError(
                f"strategy=single under a launcher that started {env['world_size']} "
                "processes would train the whole job once per process; add strategy=ddp"
            )
        cfg = with_values(
            cfg,
            {
                "trainer.devices": env["devices"],
                "trainer.num_nodes": env["world_size"] // env["devices"],
            },
        )
    for key in ("root", "path"):
        value = cfg.data.get(key)
        if value:  # every process, and a later eval from any folder, finds the data
            cfg = with_values(
                cfg, {f"data.{key}": str(Path(value).expanduser().resolve())}
            )
    check_data(cfg)
    check_logger(cfg)
    t = cfg.trainer
    if env is None and t.num_nodes > 1:
        raise ConfigError(
            f"trainer.num_nodes={t.num_nodes} needs a launcher on every node "
            "(torchrun or srun, see the README); on one machine use trainer.num_nodes=1"
        )
    import torch

    gpus = torch.cuda.device_count()
    accelerator = t.accelerator.value
    if accelerator == "gpu" and gpus == 0:
        raise ConfigError(
            "trainer.accelerator=gpu but no CUDA GPU is visible; "
            "use trainer.accelerator=cpu (or auto)"
        )
    on_gpu = accelerator == "gpu" or (accelerator == "auto" and gpus > 0)
    available = gpus if on_gpu else (os.cpu_count() or 1)
    if env is None and t.devices > available:
        kind = "GPUs" if on_gpu else "CPU cores"
        raise ConfigError(
            f"trainer.devices={t.devices} but this machine has {available} {kind}; "
            f"use trainer.devices={available} or fewer"
        )
    if not on_gpu and t.precision == "16-mixed":
        raise ConfigError(
            "trainer.precision=16-mixed needs a GPU; on CPU use bf16-mixed or 32-true"
        )
    if cfg.strategy.get("backend") == "nccl" and not on_gpu:
        raise ConfigError("strategy.backend=nccl needs GPUs; on CPU use gloo (or null)")
    if cfg.strategy.get("cpu_offload") and not on_gpu:
        raise ConfigError(
            "strategy.cpu_offload=true moves sharded parameters from GPU memory to the "
            "host; this run is on CPU already; set strategy.cpu_offload=false"
        )
    return cfg


def _check_slurm_layout() -> None:
    """srun with a different number of tasks on some node leaves ranks waiting
    for peers that never come: refuse it before any process group forms."""
    env = os.environ
    tasks = _env_int("SLURM_NTASKS", 1, default=1)
    if "SLURM_PROCID" not in env or tasks <= 1:
        return
    nodes = _env_int("SLURM_NNODES", 1, default=1)
    per_node = env.get("SLURM_NTASKS_PER_NODE", "")
    uneven = tasks % nodes or ("(" in per_node or "," in per_node)
    if per_node.isdigit() and int(per_node) * nodes != tasks:
        uneven = True
    if uneven:
        raise LauncherError(
            f"srun started {tasks} tasks on {nodes} nodes (SLURM_NTASKS_PER_NODE="
            f"{per_node or 'unset'}); dltrain needs the same number of tasks on every "
            "node: use --ntasks-per-node=G with --nodes=N"
        )


def _check_launcher_layout(cfg: DictConfig, env: dict[str, int]) -> None:
    """A trainer.devices or num_nodes that disagrees with torchrun/srun would make
    Lightning wait for ranks that do not exist; the launcher's layout wins only
    when the config left them at 1."""
    nodes = env["world_size"] // env["devices"]
    for key, wanted, actual in (
        ("devices", cfg.trainer.devices, env["devices"]),
        ("num_nodes", cfg.trainer.num_nodes, nodes),
    ):
        if wanted != 1 and wanted != actual:
            raise ConfigError(
                f"trainer.{key}={wanted} but the launcher started {env['world_size']} "
                f"processes, {env['devices']} per node on {nodes} node(s); make them "
                f"agree (trainer.{key}={actual}) or leave trainer.{key} out"
            )


def check_data(cfg: DictConfig) -> None:
    """Read the data once, so a missing or broken file, or splits that cannot be
    made, fail before any process starts."""
    from dltrain.data import readers
    from dltrain.data.splits import split_indices

    data = cfg.data
    if data.name == "text":
        min_chars = readers.text_min_chars(
            data.window, data.val_fraction, data.test_fraction
        )
        text, source = readers.read_text(
            Path(data.path) if data.path else None, min_chars
        )
        if len(set(text)) < 2:
            raise ConfigError(
                f"{source} holds a single distinct character; a language model "
                "needs at least two"
            )
        return
    if data.name == "mnist":
        if not data.root:
            raise ConfigError(
                "data=mnist needs data.root: a folder of MNIST IDX files, "
                "e.g. data.root=../shared/data/mnist"
            )
        labels = readers.load_mnist(Path(data.root)).labels
    else:
        labels = readers.load_digits().labels
    try:
        split_indices(
            labels,
            data.val_fraction,
            data.test_fraction,
            cfg.seed,
            data.fold,
            data.folds,
        )
    except readers.DataError as err:
        raise ConfigError(
            f"data.val_fraction={data.val_fraction} and data.test_fraction="
            f"{data.test_fraction} cannot split {len(labels)} samples of "
            f"{len(set(labels.tolist()))} classes ({err}); use larger fractions"
        ) from None


def with_values(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    """A validated copy of ``cfg`` with dotted keys set to new values."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    with open_dict(cfg):
        for key, value in values.items():
            OmegaConf.update(cfg, key, value)
    from dltrain.trainers.schema import validate

    return validate(cfg)


def start(
    cfg: DictConfig,
    overrides: list[str],
    job: str,
    make_dir,
    ckpt: Path | None = None,
    resume: Path | None = None,
) -> tuple[Path, dict[str, Any] | None]:
    """Run ``job`` ("fit" or "eval") with the processes ``cfg`` asks for.

    ``make_dir(cfg)`` makes the run directory (on one process only); ``resume``
    continues that run instead, as ``run.resume=auto`` may. Returns the run
    directory and the report (``None`` on ranks other than 0).
    """
    cfg = preflight(cfg)
    env = launcher_env()
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    if env is not None and env["world_size"] > 1:
        run_dir, action = _shared_run_dir(cfg, overrides, job, make_dir, env, resume)
        rank_zero = env["rank"] == 0
    else:
        run_dir, action = _prepare(cfg, overrides, job, make_dir, resume, world)
        rank_zero = True
    if action == "finished":
        if rank_zero:
            print(
                f"run.resume=auto: {run_dir} finished its {cfg.trainer.max_epochs} "
                "epochs already; nothing to do (raise trainer.max_epochs to train on)",
                file=sys.stderr,
                flush=True,
            )
        report = json.loads((run_dir / rundir.REPORT).read_text())
        return run_dir, report if rank_zero else None
    resuming = action == "resume"
    try:
        if world > 1 and env is None:
            _spawn_workers(
                run_dir, job, ckpt, cfg.trainer.devices, resuming, cfg.run.max_restarts
            )
            report = json.loads((run_dir / rundir.REPORT).read_text())
        else:
            from dltrain.trainers.run import execute  # Lightning: only once needed

            report = execute(run_dir, job, ckpt, resume=resuming)
    except BaseException as err:
        interrupted = _interruption(err)
        if rank_zero:
            rundir.update_manifest(
                run_dir,
                status="interrupted" if interrupted else "failed",
                error=interrupted or _first_line(err),
                finished_at=rundir.finished_at(),
            )
        if interrupted:
            raise Interrupted(interrupted, _signal_number(err)) from None
        raise
    if rank_zero:
        rundir.update_manifest(
            run_dir, status="finished", finished_at=rundir.finished_at()
        )
    return run_dir, report if rank_zero else None


def _prepare(cfg, overrides, job, make_dir, resume, world) -> tuple[Path, str]:
    """On one process: the run directory, and whether the run starts "fresh",
    "resume"s, or has "finished" already (run.resume=auto)."""
    from dltrain.trainers.checkpoint import check_resumable

    if job == "fit" and (resume is not None or cfg.run.dir):
        rundir.lock_folder(resume or Path(cfg.run.dir).expanduser())
    if resume is None and job == "fit":
        action, path = rundir.auto_resume(cfg)
        if action == "finished":
            return path, action
        if action == "resume":
            print(
                f"run.resume=auto: continuing {path} from its last checkpoint",
                file=sys.stderr,
                flush=True,
            )
            resume = path
        if action == "restart":
            print(
                f"run.resume=auto: {path} stopped before its first checkpoint; "
                "starting it again from the beginning",
                file=sys.stderr,
                flush=True,
            )
            rundir.write_run(path, cfg, overrides, world, job)
            return path, "fresh"
    if resume is not None:
        check_resumable(resume, cfg, world)  # before the run folder is touched
        rundir.resume_run(resume, cfg, overrides, world)
        return resume, "resume"
    run_dir = make_dir(cfg)
    rundir.write_run(run_dir, cfg, overrides, world, job)
    return run_dir, "fresh"


def _shared_run_dir(cfg, overrides, job, make_dir, env, resume) -> tuple[Path, str]:
    """torchrun/srun: rank 0 prepares the run directory, every rank learns it."""
    import torch
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available() and cfg.trainer.accelerator.value != "cpu"
    if on_gpu:
        # torchrun sets LOCAL_RANK; srun sets SLURM_LOCALID.
        local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        torch.cuda.set_device(int(local))
    backend = cfg.strategy.get("backend") or ("nccl" if on_gpu else "gloo")
    if "MASTER_ADDR" not in os.environ:  # srun sets no rendezvous address: derive it
        from lightning_fabric.plugins.environments import SLURMEnvironment

        slurm = SLURMEnvironment()
        os.environ["MASTER_ADDR"] = slurm.main_address
        os.environ["MASTER_PORT"] = str(slurm.main_port)
    if not dist.is_initialized():
        # Lightning reuses this process group instead of making its own.
        dist.init_process_group(
            backend=backend, rank=env["rank"], world_size=env["world_size"]
        )
    box: list[Any] = [None]
    if env["rank"] == 0:
        try:
            run_dir, action = _prepare(
                cfg, overrides, job, make_dir, resume, env["world_size"]
            )
            box[0] = (str(run_dir), action)
        except ConfigError as err:
            box[0] = err
    dist.broadcast_object_list(box, src=0)  # a refusal on rank 0 ends every rank
    if isinstance(box[0], ConfigError):
        raise box[0]
    return Path(box[0][0]), box[0][1]


def _spawn_workers(
    run_dir: Path,
    job: str,
    ckpt: Path | None,
    nproc: int,
    resume: bool = False,
    max_restarts: int = 0,
) -> None:
    """Start ``nproc`` workers on this machine through PyTorch's elastic agent.

    If a worker fails, the agent ends the others and, up to ``max_restarts``
    times, starts the group again; each restart resumes from last.ckpt.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if os.environ.get("DLTRAIN_DEBUG") != "1":  # its shutdown warnings repeat ours
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    # The agent's per-worker log folders stay empty (output is not redirected).
    logs = tempfile.mkdtemp(prefix="dltrain-agent-")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"dltrain-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        rdzv_configs={"timeout": 120},
        max_restarts=max_restarts if job == "fit" else 0,
        monitor_interval=0.2,
        start_method="spawn",
        local_addr="127.0.0.1",
        logs_specs=DefaultLogsSpecs(log_dir=logs),
    )
    # Like torchrun: split the cores between the workers unless the user chose.
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))
    )
    args = ["-m", "dltrain.trainers.worker", "--job", job, str(run_dir)]
    if ckpt is not None:
        args += ["--ckpt", str(ckpt)]
    if resume:
        args.append("--resume")
    forwarding = _forward_to_children(signal.SIGUSR1)
    try:
        elastic_launch(config, entrypoint=sys.executable)(*args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        killed = [(r, f) for r, f in sorted(err.failures.items()) if f.exitcode < 0]
        if killed:  # a killed worker is the cause; its peers' errors follow from it
            rank, failure = killed[0]
        signum = failure.exitcode - 128
        if signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            # The workers were signalled, not this process: they stopped cleanly.
            raise Interrupted(
                f"interrupted by {signal.Signals(signum).name}", signum
            ) from None
        if failure.exitcode < 0:
            cause = f"was killed by signal {-failure.exitcode}"
        else:
            cause = (
                f"failed with exit code {failure.exitcode} (its error is printed above)"
            )
        raise WorkersFailed(f"worker rank {rank} {cause}", failure.exitcode) from None
    finally:
        signal.signal(signal.SIGUSR1, forwarding)
        shutil.rmtree(logs, ignore_errors=True)


def _forward_to_children(signum: int) -> Any:
    """Pass ``signum`` on to this process's children (the workers), which stop
    at their next agreed step. PyTorch's agent forwards SIGTERM and SIGINT
    itself; SIGUSR1 (a scheduler's warning) would otherwise kill the launcher.
    Returns the previous handler."""

    def forward(sig: int, frame: Any) -> None:
        me = str(os.getpid())
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:  # the parent pid
                try:
                    os.kill(int(proc.name), sig)
                except ProcessLookupError:
                    pass

    return signal.signal(signum, forward)


def _first_line(err: Any) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
