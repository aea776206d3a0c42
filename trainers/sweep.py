"""Sweeps: a grid of trials, each a `dltrain fit` in its own run directory.

The grid comes from Hydra's own override grammar (``optim.lr=0.1,0.01``,
``range(...)``, ``choice(...)``) expanded by Hydra's basic sweeper. A scheduler
starts trials as devices free up: GPUs on a machine that has them, CPU cores
otherwise; each trial takes ``trainer.devices`` of them, small trials are packed
beside each other, and no device ever runs two trials. On a cluster the trials
go to SLURM through submitit instead, with the resources of each trial's config.

A sweep folder holds ``sweep.json`` (the grid: what makes it this sweep), an
append-only ``journal.jsonl`` (when each trial started and how it ended), one
run directory per trial under ``trials/``, each trial's output under ``logs/``,
and ``results.json`` / ``results.md``. ``dltrain sweep --resume DIR`` reads the
journal and runs only what has not finished.

Imports no torch: the trials are separate processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dltrain.trainers import rundir
from dltrain.trainers.errors import ConfigError

SWEEP_FILE = "sweep.json"
JOURNAL = "journal.jsonl"
RESULTS = "results.json"
RESULTS_MD = "results.md"
EXPERIMENT_COPY = "experiment.yaml"
# Keys the sweep itself sets for every trial, or that describe the sweep.
RESERVED = ("run.dir", "run.resume", "sweep.")
MAX_TRIALS = 10_000
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# dltrain's exit codes after SIGINT, SIGTERM, SIGUSR1: the trial can resume.
INTERRUPTED_CODES = {128 + int(s) for s in STOP_SIGNALS}
# The metrics shown beside the ranking metric, by task.
# The first ranks by default: the validation metric that picked each trial's
# checkpoint (choosing by a test metric would tune on the test split).
SHOWN = {
    "classification": ("val_acc", "accuracy", "f1_macro", "auroc"),
    "language_model": ("val_loss", "perplexity", "accuracy"),
}
MONITOR = {"val_acc": "max", "val_loss": "min"}
# What a trial's report (and its validation log) holds, by task.
RANKABLE = {
    "classification": (
        "val_acc", "val_loss", "accuracy", "top_k_accuracy", "calibration_error",
        "precision_macro", "precision_weighted", "recall_macro", "recall_weighted",
        "f1_macro", "f1_weighted", "auroc",
    ),
    "language_model": (
        "val_acc", "val_loss", "cross_entropy", "perplexity", "bits_per_char",
        "accuracy", "top_k_accuracy", "calibration_error",
    ),
}  # fmt: skip
LOWER_IS_BETTER = ("loss", "perplexity", "error", "cross_entropy", "seconds")


@dataclass
class Trial:
    id: str
    overrides: list[str]  # every override of this trial, in order
    params: dict[str, str]  # the swept keys and this trial's values
    devices: int = 1
    num_nodes: int = 1
    accelerator: str = "auto"

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params.items())


@dataclass
class Sweep:
    folder: Path
    spec: dict[str, Any]
    trials: list[Trial] = field(default_factory=list)

    @property
    def experiment_file(self) -> Path | None:
        name = self.spec.get("experiment_file")
        return self.folder / name if name else None


# --- the grid -----------------------------------------------------------------


def expand(overrides: list[str]) -> list[tuple[list[str], dict[str, str]]]:
    """Every trial's overrides and its swept values, from Hydra's sweep syntax.

    Raises:
        ConfigError: an override that does not parse, a grid with no sweep in
            it or with a sweep of no values, or a key the sweep sets itself.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from dltrain.cli.compose import check_override_words

    check_override_words(overrides)
    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.extend(parser.parse_overrides([text]))
        except HydraException as err:
            first = str(err).strip().splitlines()[0]
            raise ConfigError(
                f"override {text!r} does not parse ({first}); write key=a,b for a "
                "list of values, or key=range(start,stop,step)"
            ) from None
    for override in parsed:
        key = override.get_key_element()
        if any(key.lstrip("+~").startswith(r) for r in RESERVED):
            if override.is_sweep_override() or not key.startswith("sweep."):
                raise ConfigError(
                    f"{override.input_line!r}: the sweep sets {key} itself for "
                    "each trial; drop it (sweep.* settings take one value)"
                )
    swept = [o for o in parsed if o.is_sweep_override()]
    if not swept:
        raise ConfigError(
            "the grid is empty: no key has several values; give at least one, e.g. "
            "dltrain sweep optim.lr=0.01,0.001 (or range(...), choice(...))"
        )
    for override in swept:
        values = list(override.sweep_string_iterator())
        if not values:
            raise ConfigError(
                f"{override.input_line!r} expands to no values; give at least one, "
                f"e.g. {override.get_key_element()}=a,b"
            )
    (batches,) = BasicSweeper.split_arguments(parsed, None)
    keys = [o.get_key_element() for o in swept]
    trials = []
    for trial_overrides in batches:
        pairs = (text.partition("=") for text in trial_overrides)
        params = {key: value for key, _, value in pairs if key in keys}
        trials.append((trial_overrides, params))
    return trials


def plan(
    config_file: Path | None, overrides: list[str], say=None
) -> tuple[DictConfig, list]:
    """Compose and validate every trial's config before anything starts.

    Returns the first trial's config (its ``sweep`` settings rule the sweep)
    and the trials.
    """
    from dltrain.cli.compose import compose

    expanded = expand(overrides)
    if len(expanded) > MAX_TRIALS:
        raise ConfigError(
            f"the grid has {len(expanded):,} trials, more than the {MAX_TRIALS:,} a "
            "sweep runs; give fewer values (e.g. a coarser range(start,stop,step))"
        )
    if say is not None and len(expanded) >= 50:
        say(f"sweep: checking the {len(expanded):,} trials' configs")
    trials, first, checked = [], None, set()
    width = max(3, len(str(len(expanded) - 1)))
    for n, (trial_overrides, params) in enumerate(expanded):
        try:
            cfg, _ = compose(config_file, trial_overrides)
        except ConfigError as err:
            text = str(err).lstrip("'\"")
            if text.startswith(("sweep.", "--config")) or " sweep." in text:
                raise  # the whole sweep's setting or file, not this trial's
            label = " ".join(f"{k}={v}" for k, v in params.items())
            raise ConfigError(f"trial {n:0{width}d} ({label}): {err}") from None
        first = first or cfg
        _check_inputs(cfg, checked)
        ranking(cfg)
        trials.append(
            Trial(
                id=f"{n:0{width}d}",
                overrides=list(trial_overrides),
                params=params,
                devices=cfg.trainer.devices,
                num_nodes=cfg.trainer.num_nodes,
                accelerator=cfg.trainer.accelerator.value,
            )
        )
    return first, trials


def _check_inputs(cfg: DictConfig, checked: set[str]) -> None:
    """Read each distinct data set and logger once, as a fit would before its
    first process: a missing file fails the sweep, not every trial."""
    from dltrain.trainers.launch import check_data, check_logger

    for name, check in (("data", check_data), ("logger", check_logger)):
        node = OmegaConf.to_container(cfg[name], resolve=True, enum_to_str=True)
        key = name + json.dumps(node, sort_keys=True)
        if key not in checked:
            check(cfg)
            checked.add(key)


# --- the sweep folder ---------------------------------------------------------


def fingerprint(config_text: str | None, trials: list[Trial]) -> str:
    """What makes a sweep this sweep: its experiment file and its trials."""
    body = json.dumps(
        {"config": config_text, "trials": [t.overrides for t in trials]},
        sort_keys=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def create(
    cfg: DictConfig, config_file: Path | None, overrides: list[str], trials: list
) -> Sweep:
    """Make the sweep folder and write ``sweep.json``; refuse another sweep's."""
    config_text = config_file.read_text() if config_file else None
    mark = fingerprint(config_text, trials)
    if cfg.sweep.dir:
        folder = Path(cfg.sweep.dir).expanduser()
        _check_free(folder, mark)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(cfg.sweep.root).expanduser() / f"{cfg.experiment}_{stamp}"
        folder, n = base, 1
        while folder.exists():
            n += 1
            folder = base.with_name(f"{base.name}-{n}")
    folder = _make_folder(folder)
    _lock(folder)
    if config_text is not None:
        (folder / EXPERIMENT_COPY).write_text(config_text)
    metric, mode = ranking(cfg)
    spec = {
        "fingerprint": mark,
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "config_file": str(config_file) if config_file else None,
        "experiment_file": EXPERIMENT_COPY if config_text is not None else None,
        "overrides": list(overrides),
        "cwd": os.getcwd(),  # relative paths in the config are read from here
        "keys": list(trials[0].params),
        "metric": metric,
        "mode": mode,
        "launcher": cfg.sweep.launcher.value,
        "max_parallel": cfg.sweep.max_parallel,
        "slurm": OmegaConf.to_container(cfg.sweep.slurm),
        "trials": [
            {
                "id": t.id,
                "overrides": t.overrides,
                "params": t.params,
                "devices": t.devices,
                "num_nodes": t.num_nodes,
                "accelerator": t.accelerator,
            }
            for t in trials
        ],
    }
    rundir.write_json(folder / SWEEP_FILE, spec)
    (folder / JOURNAL).touch()
    return Sweep(folder, spec, list(trials))


def _check_free(folder: Path, mark: str) -> None:
    spec_file = folder / SWEEP_FILE
    if spec_file.is_file() and in_use(folder):
        raise ConfigError(
            f"sweep.dir={folder} is in use by a running sweep; wait for it to end, "
            "or choose another sweep.dir"
        )
    if spec_file.is_file():
        other = read_spec(folder)
        if other.get("fingerprint") == mark:
            raise ConfigError(
                f"sweep.dir={folder} holds this sweep already; continue it with "
                f"dltrain sweep --resume {folder}"
            )
        raise ConfigError(
            f"sweep.dir={folder} belongs to another sweep (its grid: "
            f"{' '.join(other.get('overrides', []))}); choose another sweep.dir, or "
            f"continue that one with dltrain sweep --resume {folder}"
        )
    if folder.is_dir() and any(folder.iterdir()):
        raise ConfigError(
            f"sweep.dir={folder} is a folder with other files in it and no "
            f"{SWEEP_FILE}; choose a new or empty folder"
        )
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"sweep.dir={folder} is a file; choose a folder")


def _make_folder(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "trials").mkdir(exist_ok=True)
        (folder / "logs").mkdir(exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"sweep.dir={folder}: cannot create it ({err.strerror}); choose a "
            "writable folder"
        ) from None
    return folder.resolve()


def read_spec(folder: Path) -> dict[str, Any]:
    path = folder / SWEEP_FILE
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{folder} is not a sweep folder (no {SWEEP_FILE}); give a folder made "
            "by dltrain sweep"
        ) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{path}: not readable ({err}); the sweep is damaged"
        ) from None
    if not isinstance(spec, dict) or not isinstance(spec.get("trials"), list):
        raise ConfigError(f"{path}: not a dltrain sweep file (no trials)")
    return spec


def load(folder: Path) -> Sweep:
    spec = read_spec(folder)
    try:
        trials = [
            Trial(
                id=str(t["id"]),
                overrides=list(t["overrides"]),
                params=dict(t["params"]),
                devices=int(t.get("devices", 1)),
                num_nodes=int(t.get("num_nodes", 1)),
                accelerator=str(t.get("accelerator", "auto")),
            )
            for t in spec["trials"]
        ]
        for key in ("metric", "mode", "keys"):
            spec[key]  # noqa: B018 (present, or the file is not a sweep's)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(
            f"{folder / SWEEP_FILE}: not a complete dltrain sweep file (missing or "
            f"bad {err}); the sweep is damaged: start it again in a new sweep.dir"
        ) from None
    return Sweep(folder.resolve(), spec, trials)


def in_use(folder: Path) -> bool:
    """Whether a running sweep holds ``folder`` (see rundir.lock_folder)."""
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def ranking(cfg: DictConfig) -> tuple[str, str]:
    """The metric that ranks the trials and whether higher is better."""
    task = "language_model" if cfg.data.name == "text" else "classification"
    metric = cfg.sweep.metric or SHOWN[task][0]
    if metric not in RANKABLE[task]:
        raise ConfigError(
            f"sweep.metric={metric!r} is not a metric of a {task} report; choose "
            f"one of: {', '.join(RANKABLE[task])}"
        )
    mode = cfg.sweep.mode.value
    if mode == "auto":
        mode = "min" if any(w in metric for w in LOWER_IS_BETTER) else "max"
    return metric, mode


# --- the journal --------------------------------------------------------------


def record(folder: Path, **event: Any) -> None:
    """Append one event to the journal, on disk before the call returns."""
    event = {"time": round(time.time(), 3), **event}
    with (folder / JOURNAL).open("a") as handle:
        handle.write(json.dumps(event) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def states(folder: Path) -> dict[str, dict[str, Any]]:
    """Each trial's latest state from the journal: started, finished, failed,
    interrupted; with the times of its last attempt and its attempts so far."""
    result: dict[str, dict[str, Any]] = {}
    path = folder / JOURNAL
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash: the trial reruns
        state = result.setdefault(event["trial"], {"attempts": 0})
        if event["event"] == "started":
            state.update(
                status="started",
                started=event["time"],
                ended=None,
                attempts=state["attempts"] + 1,
                slots=event.get("slots"),
            )
        elif state.get("started") is not None:
            state.update(
                status=event["event"],
                ended=event["time"],
                exit_code=event.get("exit_code"),
                error=event.get("error"),
                seconds=state.get("seconds", 0.0) + event["time"] - state["started"],
            )
    return result


# --- devices ------------------------------------------------------------------


def device_slots(accelerator: str) -> tuple[str, list[str]]:
    """The devices trials are scheduled on: ("gpu", [indices]) or ("cpu", [cores])."""
    if accelerator != "cpu" and (
        accelerator == "gpu" or shutil.which("nvidia-smi") is not None
    ):
        import torch

        count = torch.cuda.device_count()
        if count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [v.strip() for v in visible.split(",")] if visible else None
            return "gpu", (ids[:count] if ids else [str(i) for i in range(count)])
        if accelerator == "gpu":
            raise ConfigError(
                "trainer.accelerator=gpu but this machine shows no GPU; use "
                "trainer.accelerator=cpu, or run the sweep where the GPUs are "
                "(sweep.launcher=slurm)"
            )
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return "cpu", [str(c) for c in cores] or [
        str(c) for c in range(os.cpu_count() or 1)
    ]


def check_fits(trials: list[Trial], kind: str, slots: list[str], launcher: str) -> None:
    """Refuse a trial this machine can never hold, before anything starts."""
    if launcher == "slurm":
        return
    for trial in trials:
        if trial.num_nodes > 1:
            raise ConfigError(
                f"trial {trial.id} ({trial.label}) has trainer.num_nodes="
                f"{trial.num_nodes}; a {launcher} sweep runs on this machine: use "
                "sweep.launcher=slurm for trials across nodes"
            )
        if trial.devices > len(slots):
            raise ConfigError(
                f"trial {trial.id} ({trial.label}) needs trainer.devices="
                f"{trial.devices}, but this machine has {len(slots)} {kind} "
                f"{'device' if kind == 'gpu' else 'core'}"
                f"{'s' if len(slots) != 1 else ''}; lower trainer.devices to "
                f"{len(slots)} or less, or use sweep.launcher=slurm"
            )


# --- running the trials -------------------------------------------------------


def trial_command(sweep: Sweep, trial: Trial) -> list[str]:
    """The `dltrain fit` line of one trial: its run directory is fixed, so a
    rerun continues it (run.resume=auto) instead of starting over."""
    exe = Path(sys.executable).with_name("dltrain")
    prefix = (
        [str(exe)]
        if exe.exists()
        else [sys.executable, "-c", "from dltrain.cli.app import main; main()"]
    )
    config = sweep.experiment_file
    named = any(o.lstrip("+").startswith("run.name=") for o in trial.overrides)
    return [
        *prefix,
        "fit",
        *(["--config", str(config)] if config else []),
        *trial.overrides,
        f"run.dir={_quoted(str(sweep.folder / 'trials' / trial.id))}",
        "run.resume=auto",
        # What a tracker calls the trial's run (MLflow's run name).
        *([] if named else [f"run.name={_quoted(f'{sweep.folder.name}-{trial.id}')}"]),
    ]


def _quoted(text: str) -> str:
    """A string as one value of Hydra's override grammar (commas, spaces, quotes)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class LocalLauncher:
    """Trials as child processes of this one, each pinned to its devices."""

    def __init__(self, kind: str):
        self.kind = kind

    def start(self, command: list[str], log: Path, slots: list[str], devices: int):
        env = trial_environment()
        cores: set[int] = set()
        if self.kind == "gpu":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slots)
        else:
            cores = {int(s) for s in slots}
            # One thread per core the trial holds, spread over its processes.
            env["OMP_NUM_THREADS"] = str(max(1, len(cores) // devices))

        def preexec() -> None:
            if cores and hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, cores)
            _stop_with_parent()

        with log.open("ab") as out:
            return subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=preexec,
                start_new_session=True,  # a Ctrl-C reaches the trials through us
            )

    @staticmethod
    def poll(handle) -> int | None:
        return handle.poll()

    @staticmethod
    def stop(handle, signum: int) -> None:
        if handle.poll() is None:
            handle.send_signal(signum)


# Set by torchrun or srun for the processes of one job: a trial is a job of its
# own, and with them it would wait for peers that never come.
LAUNCHER_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
    "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME",
    "MASTER_ADDR", "MASTER_PORT",
)  # fmt: skip


def trial_environment() -> dict[str, str]:
    """This process's environment without a launcher's rank variables."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCHER_VARIABLES and not k.startswith(("SLURM_", "TORCHELASTIC_"))
    }


def check_not_a_rank() -> None:
    """A sweep runs once; under torchrun or srun every rank would start it.

    A batch script's own shell (SLURM's batch step, task 0) may run it: its
    trials do not inherit the allocation's task layout (trial_environment).
    """
    env = os.environ
    world = env.get("WORLD_SIZE") if "RANK" in env else None
    if world is None and env.get("SLURM_PROCID", "0") != "0":
        world = env.get("SLURM_NTASKS")
    if world is not None and world != "1":
        raise ConfigError(
            f"dltrain sweep was started as one of {world} processes (torchrun or "
            "srun set RANK or SLURM_PROCID); start it once, as a plain command: each "
            "trial starts its own processes"
        )


def _stop_with_parent() -> None:
    """In a trial, before it starts: if the sweep dies (even by SIGKILL), the
    trial gets SIGTERM, saves its checkpoint and ends, instead of running on
    unwatched. Linux only (prctl); elsewhere a trial outlives its sweep."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run(sweep: Sweep, todo: list[Trial], kind: str, slots: list[str], say) -> int:
    """Run ``todo`` on ``slots``, recording each start and end in the journal.

    Returns the signal that stopped the sweep, or 0.
    """
    launcher_name = sweep.spec.get("launcher", "local")
    if launcher_name == "local":
        launcher = LocalLauncher(kind)
    else:
        from dltrain.trainers.slurm import SubmititLauncher

        launcher = SubmititLauncher(sweep, launcher_name, kind)
    unlimited = launcher_name == "slurm"  # SLURM places the jobs itself
    cap = sweep.spec.get("max_parallel") or (len(todo) if unlimited else len(slots))
    free = list(slots)
    queue = list(todo)
    running: dict[str, tuple[Trial, Any, list[str], float]] = {}
    counts = {"done": 0, "failed": 0, "interrupted": 0}
    stopping = 0

    def on_signal(signum, _frame):
        nonlocal stopping
        if not stopping:
            say(
                f"sweep: {signal.Signals(signum).name}: stopping the running trials "
                "(each saves its last checkpoint); resume with dltrain sweep "
                f"--resume {sweep.folder}"
            )
        stopping = signum
        for _, handle, _, _ in running.values():
            launcher.stop(handle, signum)

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    shown = None
    try:
        while queue or running:
            while not stopping and queue and len(running) < cap:
                trial = _next_fitting(queue, len(free), unlimited)
                if trial is None:
                    break
                queue.remove(trial)
                taken = [] if unlimited else free[: trial.devices]
                free = [s for s in free if s not in taken]
                command = trial_command(sweep, trial)
                log = sweep.folder / "logs" / f"{trial.id}.log"
                handle = launcher.start(command, log, taken, trial.devices)
                record(
                    sweep.folder,
                    trial=trial.id,
                    event="started",
                    slots=[f"{kind}:{s}" for s in taken],
                    job=_job_id(handle),
                )
                running[trial.id] = (trial, handle, taken, time.monotonic())
                where = f" on {kind} {','.join(taken)}" if taken else ""
                say(f"sweep: trial {trial.id} ({trial.label}) started{where}")
            for trial_id, (trial, handle, taken, began) in list(running.items()):
                code = launcher.poll(handle)
                if code is None:
                    continue
                del running[trial_id]
                free += taken
                seconds = time.monotonic() - began
                _finish(sweep, trial, code, seconds, counts, say, bool(stopping))
            if stopping and queue:
                queue.clear()
            state = (
                len(queue),
                len(running),
                counts["done"],
                counts["failed"],
                counts["interrupted"],
            )
            if state != shown:
                shown = state
                say(
                    f"sweep: {state[0]} queued, {state[1]} running, {state[2]} done, "
                    f"{state[3]} failed"
                    + (f", {state[4]} interrupted" if state[4] else "")
                )
            if running:
                time.sleep(0.2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return stopping


def _next_fitting(queue: list[Trial], free: int, unlimited: bool) -> Trial | None:
    """The first queued trial that fits in the free devices: a trial too big
    for now waits, and smaller ones behind it go first."""
    for trial in queue:
        if unlimited or trial.devices <= free:
            return trial
    return None


def _job_id(handle) -> str | None:
    return str(getattr(handle, "job_id", None) or getattr(handle, "pid", "")) or None


def _finish(
    sweep: Sweep, trial: Trial, code: int, seconds: float, counts, say, stopped: bool
) -> None:
    report = sweep.folder / "trials" / trial.id / rundir.REPORT
    if report.is_file() and (code == 0 or _run_finished(report.parent)):
        # (A stop that reached a trial after its run had finished changes nothing.)
        record(sweep.folder, trial=trial.id, event="finished", exit_code=0)
        counts["done"] += 1
        metric = sweep.spec["metric"]
        try:
            value = json.loads(report.read_text())["metrics"].get(metric)
        except (OSError, ValueError, KeyError):
            value = None
        score = f": {metric} {value:.4f}" if isinstance(value, (int, float)) else ""
        say(f"sweep: trial {trial.id} finished in {seconds:.1f} s{score}")
        return
    code = 128 - code if code < 0 else code  # killed by a signal: as a shell says it
    # A trial we told to stop may die of it in another way (a signal landing
    # while it imports its libraries): it did not fail, it can run again.
    if code in INTERRUPTED_CODES or (stopped and code != 0):
        record(sweep.folder, trial=trial.id, event="interrupted", exit_code=code)
        counts["interrupted"] += 1
        say(f"sweep: trial {trial.id} interrupted (exit {code}); it can resume")
        return
    error = _last_error(sweep.folder / "logs" / f"{trial.id}.log")
    if code == 0:
        error = error or f"exited 0 without {rundir.REPORT}"
    record(
        sweep.folder, trial=trial.id, event="failed", exit_code=code or 1, error=error
    )
    counts["failed"] += 1
    say(f"sweep: trial {trial.id} failed (exit {code}): {error}")


def _run_finished(run_dir: Path) -> bool:
    try:
        return rundir.read_manifest(run_dir).get("status") == "finished"
    except ConfigError:
        return False


def _last_error(log: Path) -> str:
    """The trial's own one-line error, from the end of its output."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no output"
    for line in reversed(lines):
        if line.startswith("error:"):
            return line.removeprefix("error:").strip()
    tail = [line.strip() for line in lines if line.strip()]
    return tail[-1][:300] if tail else "no output"


# --- results ------------------------------------------------------------------


def results(sweep: Sweep) -> dict[str, Any]:
    """Every trial with its parameters, metrics, time and status, ranked."""
    metric, mode = sweep.spec["metric"], sweep.spec["mode"]
    journal = states(sweep.folder)
    live = in_use(sweep.folder)
    rows, task = [], None
    for trial in sweep.trials:
        state = journal.get(trial.id, {})
        status = state.get("status", "queued")
        if status == "started":
            # Running now, or the sweep died while it ran (it reruns on resume).
            status = "running" if live else "stopped"
        row: dict[str, Any] = {
            "trial": trial.id,
            "params": trial.params,
            "status": status,
            "exit_code": state.get("exit_code"),
            "error": state.get("error"),
            "seconds": None,
            "attempts": state.get("attempts", 0),
            "metrics": {},
            "run_dir": str(sweep.folder / "trials" / trial.id),
        }
        if state.get("seconds") is not None:
            row["seconds"] = round(state["seconds"], 1)  # every attempt's time
        report_file = sweep.folder / "trials" / trial.id / rundir.REPORT
        if status == "finished" and report_file.is_file():
            report = json.loads(report_file.read_text())
            task = task or report.get("task")
            row["metrics"] = {
                **_validation(sweep.folder / "trials" / trial.id),
                **{
                    k: v
                    for k, v in report.get("metrics", {}).items()
                    if isinstance(v, (int, float))
                },
            }
        rows.append(row)

    def key(row):
        value = row["metrics"].get(metric)
        if value is None:
            return (1, 0.0, row["trial"])
        return (0, -value if mode == "max" else value, row["trial"])

    rows.sort(key=key)
    best = rows[0]["trial"] if rows and metric in rows[0]["metrics"] else None
    for row in rows:
        row["best"] = row["trial"] == best
    shown = [metric] + [m for m in SHOWN.get(task or "", ()) if m != metric][:3]
    counts = {s: sum(r["status"] == s for r in rows) for s in _STATUSES}
    return {
        "sweep_dir": str(sweep.folder),
        "metric": metric,
        "mode": mode,
        "keys": sweep.spec.get("keys", []),
        "columns": shown,
        "best": best,
        "counts": counts,
        "trials": rows,
    }


def _validation(run_dir: Path) -> dict[str, float]:
    """The validation metrics of the epoch whose checkpoint was tested (the best
    by the run's monitor), from the run's metrics.csv."""
    import csv

    path = run_dir / "logs" / "metrics.csv"
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        return {}
    for monitor, mode in MONITOR.items():
        scored = [r for r in rows if r.get(monitor)]
        if scored:
            pick = max if mode == "max" else min
            best = pick(scored, key=lambda r: float(r[monitor]))
            return {k: float(v) for k, v in best.items() if k.startswith("val_") and v}
    return {}


_STATUSES = ("finished", "failed", "interrupted", "running", "stopped", "queued")


def write_results(sweep: Sweep, table: dict[str, Any]) -> None:
    rundir.write_json(sweep.folder / RESULTS, table)
    (sweep.folder / RESULTS_MD).write_text(to_markdown(table))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def table_rows(table: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results table, as the terminal and Markdown show it."""
    header = ["", "trial", *table["keys"], *table["columns"], "time (s)", "status"]
    rows = []
    for row in table["trials"]:
        status = row["status"]
        if status == "failed":
            status = f"failed (exit {row['exit_code']}): {row['error']}"
        rows.append(
            [
                "best" if row["best"] else "",
                row["trial"],
                *[row["params"].get(k, "") for k in table["keys"]],
                *[_cell(row["metrics"].get(m)) for m in table["columns"]],
                "-" if row["seconds"] is None else f"{row['seconds']:.1f}",
                status,
            ]
        )
    return header, rows


_SPLITS = (
    "val_* are on the validation split, at the epoch of the checkpoint each trial "
    "tested; the other metrics on its test split."
)


def to_markdown(table: dict[str, Any]) -> str:
    header, rows = table_rows(table)
    order = "higher" if table["mode"] == "max" else "lower"
    lines = [
        f"# Sweep {Path(table['sweep_dir']).name}",
        "",
        f"Ranked by {table['metric']} ({order} is better). {_SPLITS} "
        + ", ".join(f"{n} {s}" for s, n in table["counts"].items() if n),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_results(table: dict[str, Any], console) -> None:
    from rich.table import Table

    header, rows = table_rows(table)
    order = "higher" if table["mode"] == "max" else "lower"
    grid = Table(
        title=f"sweep {Path(table['sweep_dir']).name}: ranked by {table['metric']} "
        f"({order} is better)"
    )
    for name in header:
        grid.add_column(name, overflow="fold")
    for row in rows:
        grid.add_row(*row, style="bold" if row[0] == "best" else None)
    console.print(grid)


# --- the two entry points -----------------------------------------------------


def start(
    config_file: Path | None, overrides: list[str], max_parallel: int | None, say
) -> tuple[Sweep, dict[str, Any], int]:
    """Plan, check and run a new sweep. Returns it, its results table, and the
    signal that stopped it (0 if none)."""
    check_not_a_rank()
    cfg, trials = plan(config_file, overrides, say)
    launcher = cfg.sweep.launcher.value
    check_launcher(launcher, max_parallel)
    kind, slots = device_slots(_accelerator(trials))
    check_fits(trials, kind, slots, launcher)
    sweep = create(cfg, config_file, overrides, trials)
    if max_parallel is not None:
        sweep.spec["max_parallel"] = max_parallel
        rundir.write_json(sweep.folder / SWEEP_FILE, sweep.spec)
    return _run_all(sweep, sweep.trials, kind, slots, say)


def resume(
    folder: Path, retry_failed: bool, max_parallel: int | None, say
) -> tuple[Sweep, dict[str, Any], int]:
    """Run the trials of the sweep in ``folder`` that have not finished (and,
    with ``retry_failed``, those that failed)."""
    check_not_a_rank()
    if not folder.is_dir():
        raise ConfigError(f"--resume {folder}: no such sweep folder")
    sweep = load(folder)
    check_launcher(sweep.spec.get("launcher", "local"), max_parallel)
    _lock(sweep.folder)
    _enter_started_folder(sweep)
    if max_parallel is not None:
        sweep.spec["max_parallel"] = max_parallel
        rundir.write_json(sweep.folder / SWEEP_FILE, sweep.spec)
    journal = states(sweep.folder)
    wanted = {"queued", "started", "interrupted"} | (
        {"failed"} if retry_failed else set()
    )
    todo = [
        t
        for t in sweep.trials
        if journal.get(t.id, {}).get("status", "queued") in wanted
    ]
    failed = sum(s.get("status") == "failed" for s in journal.values())
    if not todo:
        hint = (
            f"; {failed} failed: add --retry-failed to run them again"
            if failed and not retry_failed
            else ""
        )
        say(f"sweep: nothing left to run in {sweep.folder}{hint}")
        table = results(sweep)
        write_results(sweep, table)
        return sweep, table, 0
    kind, slots = device_slots(_accelerator(sweep.trials))
    check_fits(todo, kind, slots, sweep.spec.get("launcher", "local"))
    _recheck(sweep, todo)
    skipped = len(sweep.trials) - len(todo)
    say(f"sweep: resuming {sweep.folder}: {len(todo)} to run, {skipped} kept")
    return _run_all(sweep, todo, kind, slots, say)


def _enter_started_folder(sweep: Sweep) -> None:
    """Run from the folder the sweep started in: relative paths in its config
    (data.path, data.root, run.root) mean what they meant then."""
    cwd = sweep.spec.get("cwd")
    if not cwd:
        return
    try:
        os.chdir(cwd)
    except OSError as err:
        raise ConfigError(
            f"{sweep.folder} was started in {cwd}, which cannot be entered now "
            f"({err.strerror}); its relative paths would point elsewhere: restore "
            "that folder, or start a new sweep"
        ) from None


def _recheck(sweep: Sweep, todo: list[Trial]) -> None:
    """Compose the trials to run again and read their data: files that went
    missing since the sweep started are refused before any trial starts."""
    from dltrain.cli.compose import compose

    checked: set[str] = set()
    for trial in todo:
        try:
            cfg, _ = compose(sweep.experiment_file, trial.overrides)
            _check_inputs(cfg, checked)
        except ConfigError as err:
            raise ConfigError(f"trial {trial.id} ({trial.label}): {err}") from None


def check_launcher(launcher: str, max_parallel: int | None) -> None:
    if max_parallel is not None and max_parallel < 1:
        raise ConfigError(
            f"--max-parallel {max_parallel} must be positive, e.g. --max-parallel 2"
        )
    if launcher != "local":
        import importlib.util

        if importlib.util.find_spec("submitit") is None:
            raise ConfigError(
                f"sweep.launcher={launcher} runs trials through submitit, which is "
                "not installed; pip install 'dltrain[slurm]', or use "
                "sweep.launcher=local"
            )
        if launcher == "slurm" and shutil.which("sbatch") is None:
            raise ConfigError(
                "sweep.launcher=slurm needs SLURM's sbatch, which is not on this "
                "machine's PATH; run the sweep on the cluster's login node, or use "
                "sweep.launcher=local"
            )


def _accelerator(trials: list[Trial]) -> str:
    kinds = {t.accelerator for t in trials}
    return "cpu" if kinds == {"cpu"} else ("gpu" if "gpu" in kinds else "auto")


def _lock(folder: Path) -> None:
    try:
        rundir.lock_folder(folder)
    except ConfigError:
        raise ConfigError(
            f"{folder} is in use by another dltrain sweep; wait for it to end"
        ) from None


def _run_all(sweep: Sweep, todo: list[Trial], kind: str, slots: list[str], say):
    cap = sweep.spec.get("max_parallel")
    where = (
        "SLURM (submitit)"
        if sweep.spec.get("launcher") == "slurm"
        else f"{len(slots)} {kind} {'device' if kind == 'gpu' else 'core'}"
        f"{'s' if len(slots) != 1 else ''}"
    )
    say(
        f"sweep: {len(todo)} trial{'s' if len(todo) != 1 else ''} of "
        f"{', '.join(sweep.spec['keys'])} on {where}"
        + (f", at most {cap} at once" if cap else "")
        + f"; folder {sweep.folder}"
    )
    stopped = run(sweep, todo, kind, slots, say)
    table = results(sweep)
    write_results(sweep, table)
    return sweep, table, stopped
