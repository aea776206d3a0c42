"""The `dltrain` command line.

Only Typer and the standard library are imported at the top: `dltrain --help`
and `dltrain fit --help` answer without importing torch or Lightning.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="dltrain",
    help="Train and evaluate models from Hydra configs with PyTorch Lightning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
config_app = typer.Typer(help="Inspect the composed config.", no_args_is_help=True)
app.add_typer(config_app, name="config")

OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}
USAGE_ERROR = 2

ConfigFile = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Experiment YAML: group choices and values."),
]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Hydra overrides: key=value, +key=value, group=option.", show_default=False
    ),
]
JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print only the report JSON on stdout.")
]


class State:
    debug = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dltrain {metadata.version('dltrain')}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version."
        ),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks and library logs.")
    ] = False,
) -> None:
    State.debug = debug


def _errors_to_exit_codes(command):
    """A user's mistake prints one line and exits 2; a crash exits 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from dltrain.data.readers import DataError
        from dltrain.trainers.errors import ConfigError

        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except (ConfigError, DataError) as err:
            if State.debug:
                raise
            from dltrain.trainers.errors import LauncherError

            # Every rank sees the same mistake: rank 0 says it (all of them say
            # what is wrong with the launcher's own variables).
            if _rank() == "0" or isinstance(err, LauncherError):
                typer.echo(f"error: {err}", err=True)
            raise typer.Exit(USAGE_ERROR) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as err:
            from dltrain.trainers.launch import Interrupted, WorkersFailed

            if isinstance(err, Interrupted):
                if _rank() == "0":
                    typer.echo(f"{err}; the run directory records it", err=True)
                raise typer.Exit(128 + err.signum) from None
            if State.debug:
                raise
            if isinstance(err, WorkersFailed):
                if err.exitcode != USAGE_ERROR:  # rank 0 printed a usage error already
                    typer.echo(f"error: {err}", err=True)
                raise typer.Exit(
                    USAGE_ERROR if err.exitcode == USAGE_ERROR else 1
                ) from None
            if type(err).__name__ == "LossDiverged":
                typer.echo(f"error: {err}", err=True)
                raise typer.Exit(1) from None
            typer.echo(f"error: {type(err).__name__}: {_first_line(err)}", err=True)
            typer.echo("(run with --debug for the traceback)", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _rank() -> str:
    """This process's global rank: torchrun's RANK, or srun's SLURM_PROCID."""
    if "RANK" in os.environ:
        return os.environ["RANK"]
    try:
        several = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        several = False
    return os.environ.get("SLURM_PROCID", "0") if several else "0"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _quiet_libraries() -> None:
    from dltrain.trainers.logs import quiet_libraries

    quiet_libraries(State.debug)
    os.environ["DLTRAIN_DEBUG"] = "1" if State.debug else "0"


def _show_report(run_dir: Path, report: dict | None, as_json: bool) -> None:
    if report is None:  # ranks other than 0 under torchrun/srun
        return
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        from rich.console import Console

        from dltrain.metrics.render import print_report

        print_report(report, Console())
    typer.echo(f"run directory: {run_dir}", err=True)


@app.command(context_settings=OVERRIDES)
@_errors_to_exit_codes
def fit(
    config: ConfigFile = None,
    overrides: Overrides = None,
    as_json: JsonFlag = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue this run from its last checkpoint (trainer.* may change).",
        ),
    ] = None,
    multirun: Annotated[
        bool,
        typer.Option(
            "--multirun",
            "-m",
            help="Sweep: one run per combination (as dltrain sweep).",
        ),
    ] = False,
    max_parallel: Annotated[
        int | None,
        typer.Option(
            "--max-parallel", help="With -m: at most this many trials at once."
        ),
    ] = None,
) -> None:
    """Train a model, test its best checkpoint, and print the report.

    Example: dltrain fit model=rnn data=text trainer.max_epochs=3
    """
    from dltrain.trainers import rundir
    from dltrain.trainers.errors import ConfigError
    from dltrain.trainers.launch import start

    if multirun:
        if resume is not None:
            raise ConfigError(
                "--multirun starts a sweep; to continue one, use "
                "dltrain sweep --resume SWEEP_DIR"
            )
        return sweep(config, overrides, max_parallel=max_parallel, as_json=as_json)
    if max_parallel is not None:
        raise ConfigError("--max-parallel goes with -m (a sweep); drop it for one run")
    if resume is not None:
        cfg, applied = _resume_config(resume, config, overrides or [])
        _quiet_libraries()
        run_dir, report = start(cfg, applied, "fit", None, resume=resume.resolve())
        _show_report(run_dir, report, as_json)
        return

    from dltrain.cli.compose import compose

    cfg, applied = compose(config, overrides or [])
    _quiet_libraries()
    run_dir, report = start(cfg, applied, "fit", rundir.new_run_dir)
    _show_report(run_dir, report, as_json)


def _resume_config(run: Path, config: Path | None, overrides: list[str]):
    """The saved config of ``run`` with its trainer.* overrides applied."""
    from dltrain.cli.compose import apply_overrides
    from dltrain.trainers import rundir
    from dltrain.trainers.errors import ConfigError

    if config is not None:
        raise ConfigError("--resume continues a run with its own config; drop --config")
    other = [o for o in overrides if not o.lstrip("+~").startswith("trainer.")]
    if other:
        raise ConfigError(
            f"--resume can change trainer.* values only, not {other[0]!r}: the rest "
            "of the run must stay what its checkpoints were trained with"
        )
    if not run.is_dir():
        raise ConfigError(f"--resume {run}: no such run directory")
    saved = rundir.load_config(run)
    cfg = apply_overrides(saved, overrides)
    manifest = rundir.read_manifest(run)
    if (
        manifest.get("status") == "finished"
        and cfg.trainer.max_epochs <= saved.trainer.max_epochs
    ):
        raise ConfigError(
            f"{run} finished its {saved.trainer.max_epochs} epochs; to train on, "
            f"give more, e.g. --resume {run} trainer.max_epochs="
            f"{saved.trainer.max_epochs * 2}"
        )
    return cfg, overrides


@app.command(name="eval", context_settings=OVERRIDES)
@_errors_to_exit_codes
def evaluate(
    run: Annotated[
        Path | None, typer.Argument(help="A run directory made by `dltrain fit`.")
    ] = None,
    ckpt: Annotated[
        Path | None,
        typer.Option("--ckpt", help="A checkpoint file (default: the run's best)."),
    ] = None,
    overrides: Overrides = None,
    as_json: JsonFlag = False,
) -> None:
    """Evaluate a trained run or checkpoint on its test split; print the report.

    Example: dltrain eval runs/default_20260101-120000 strategy=ddp trainer.devices=2
    """
    from dltrain.trainers.errors import ConfigError

    if run is not None and "=" in run.name and not run.exists():
        overrides = [str(run), *(overrides or [])]
        run = None
    if run is None and ckpt is None:
        raise ConfigError(
            "give a run directory (dltrain eval RUN) or a checkpoint (--ckpt FILE)"
        )

    from omegaconf import OmegaConf

    from dltrain.cli.compose import apply_overrides
    from dltrain.trainers import rundir
    from dltrain.trainers.checkpoint import CHECKPOINT_KEY, check_model, read_checkpoint
    from dltrain.trainers.launch import start
    from dltrain.trainers.schema import validate

    _quiet_libraries()
    if run is not None:
        if not run.is_dir():
            raise ConfigError(f"{run}: no such run directory")
        saved = rundir.load_config(run)
        ckpt = ckpt or _best_checkpoint(run)
        checkpoint = read_checkpoint(ckpt)
        out = run / "eval"
    else:
        checkpoint = read_checkpoint(ckpt)
        saved = validate(OmegaConf.create(checkpoint[CHECKPOINT_KEY]["config"]))
        out = Path(saved.run.root) / "eval"
    cfg = apply_overrides(saved, overrides or [])
    model = OmegaConf.to_container(cfg.model, enum_to_str=True)
    check_model(checkpoint, model, ckpt)  # before any folder or process is made

    def make_eval_dir(_cfg):
        from datetime import datetime

        path = out / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        try:
            path.mkdir(parents=True)
        except OSError as err:
            raise ConfigError(
                f"cannot write the eval folder {path} ({err.strerror}); "
                "copy the run somewhere writable, or use --ckpt FILE from another folder"
            ) from None
        return path.resolve()

    run_dir, report = start(
        cfg, overrides or [], "eval", make_eval_dir, ckpt=ckpt.resolve()
    )
    _show_report(run_dir, report, as_json)


def _best_checkpoint(run: Path) -> Path:
    from dltrain.trainers.errors import ConfigError

    for name in ("best.ckpt", "last.ckpt"):
        if (run / "checkpoints" / name).is_file():
            return run / "checkpoints" / name
    raise ConfigError(
        f"{run} has no checkpoint (checkpoints/best.ckpt or last.ckpt); "
        "did its fit finish? Give one with --ckpt FILE"
    )


@app.command(context_settings=OVERRIDES)
@_errors_to_exit_codes
def cv(
    folds: Annotated[int, typer.Option("--folds", "-k", help="Number of folds (K).")],
    config: ConfigFile = None,
    overrides: Overrides = None,
    as_json: JsonFlag = False,
) -> None:
    """Stratified K-fold cross-validation over train+val; test split held out.

    Example: dltrain cv --folds 5 trainer.max_epochs=10
    """
    from dltrain.cli.compose import compose

    cfg, applied = compose(config, overrides or [])
    _quiet_libraries()

    from dltrain.trainers.cv import run_cv

    parent, report = run_cv(cfg, applied, folds)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        from rich.console import Console

        from dltrain.metrics.render import print_cv

        print_cv(report, Console())
    typer.echo(f"cv directory: {parent}", err=True)


@app.command(name="report")
@_errors_to_exit_codes
def report_command(
    runs: Annotated[
        list[Path], typer.Argument(help="Run, eval or cv folders (or report files).")
    ],
    as_json: JsonFlag = False,
) -> None:
    """Show the saved report of one run, or several runs side by side.

    Nothing is recomputed: the reports are read from the run folders.
    Example: dltrain report runs/a runs/b --json
    """
    from dltrain.trainers.errors import ConfigError

    sweep_dirs = [path for path in runs if (path / "sweep.json").is_file()]
    if sweep_dirs and len(runs) > 1:
        raise ConfigError(
            f"{sweep_dirs[0]} is a sweep: a sweep's table is shown alone "
            f"(dltrain report {sweep_dirs[0]}); to compare its trials with other "
            f"runs, give their folders ({sweep_dirs[0]}/trials/NNN)"
        )
    if sweep_dirs:
        from dltrain.trainers import sweep as sweeps

        found = sweeps.load(runs[0])
        _show_sweep(sweeps.results(found), as_json)
        return
    reports = [_read_report(path) for path in runs]
    tasks = {report["task"] for report in reports}
    if len(tasks) > 1:
        raise ConfigError(
            f"cannot compare runs of different tasks ({', '.join(sorted(tasks))}); "
            "give runs of one task"
        )
    from rich.console import Console

    from dltrain.metrics.aggregate import headline
    from dltrain.metrics.render import print_comparison, print_cv, print_report

    if len(reports) == 1:
        if as_json:
            sys.stdout.write(json.dumps(reports[0], indent=2) + "\n")
        elif "per_fold" in reports[0]:
            print_cv(reports[0], Console())
        else:
            print_report(reports[0], Console())
        return
    names = [str(path) for path in runs]
    measured = [headline(report) for report in reports]
    if as_json:
        rows = [
            {"run": name, "task": report["task"], "measured_on": on, "metrics": values}
            for name, report, (on, values) in zip(names, reports, measured, strict=True)
        ]
        sys.stdout.write(json.dumps({"runs": rows}, indent=2) + "\n")
    else:
        columns = [
            f"{name}\n({on})" for name, (on, _) in zip(names, measured, strict=True)
        ]
        print_comparison(columns, [values for _, values in measured], Console())


def _read_report(path: Path) -> dict:
    from dltrain.trainers.errors import ConfigError

    candidates = (
        [path] if path.is_file() else [path / "report.json", path / "cv_report.json"]
    )
    for candidate in candidates:
        if candidate.is_file():
            try:
                report = json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ConfigError(
                    f"{candidate}: not a readable report ({err})"
                ) from None
            if (
                not isinstance(report, dict)
                or "task" not in report
                or "metrics" not in report
            ):
                raise ConfigError(
                    f"{candidate}: not a dltrain report (no task or metrics)"
                )
            return report
    raise ConfigError(
        f"{path} has no report (report.json or cv_report.json); "
        "give a finished run, eval or cv folder"
    )


@app.command(context_settings=OVERRIDES)
@_errors_to_exit_codes
def sweep(
    config: ConfigFile = None,
    overrides: Overrides = None,
    max_parallel: Annotated[
        int | None,
        typer.Option(
            "--max-parallel",
            help="At most this many trials at once (default: as the devices allow).",
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Run the trials of this sweep not yet finished."),
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="With --resume: rerun failed trials.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print only the results JSON on stdout.")
    ] = False,
) -> None:
    """Run a grid of trials, each a `dltrain fit` in its own run directory,
    scheduled onto the free devices; print the trials ranked by a metric.

    Example: dltrain sweep optim.lr=0.01,0.001 model.hidden=64,128 --max-parallel 2
    """
    from dltrain.trainers import sweep as sweeps
    from dltrain.trainers.errors import ConfigError

    def say(line: str) -> None:
        typer.echo(line, err=True)

    if resume is not None:
        if config is not None or overrides:
            raise ConfigError(
                "--resume runs the saved sweep as it was planned; drop --config and "
                "the overrides (only --max-parallel and --retry-failed apply)"
            )
        found, table, stopped = sweeps.resume(resume, retry_failed, max_parallel, say)
    else:
        if retry_failed:
            raise ConfigError("--retry-failed goes with --resume SWEEP_DIR")
        found, table, stopped = sweeps.start(config, overrides or [], max_parallel, say)
    _show_sweep(table, as_json)
    say(f"sweep directory: {found.folder}")
    if stopped:
        raise typer.Exit(128 + stopped)
    failed = table["counts"]["failed"]
    if failed:
        say(f"sweep: {failed} of {len(table['trials'])} trials failed (see the table)")
        raise typer.Exit(1)


def _show_sweep(table: dict, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(table, indent=2) + "\n")
        return
    from rich.console import Console

    from dltrain.trainers.sweep import print_results

    # A file or a pipe gets the whole table, not one folded to 80 columns.
    print_results(table, Console(width=None if sys.stdout.isatty() else 160))


@app.command(context_settings=OVERRIDES)
@_errors_to_exit_codes
def plan(
    config: ConfigFile = None,
    overrides: Overrides = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the plan as JSON on stdout.")
    ] = False,
) -> None:
    """Show what `dltrain fit` would run, without training: the strategy, world
    size and device mesh, the pipeline's stage split with measured costs, and the
    torchrun and sbatch/srun lines that launch it.

    Example: dltrain plan strategy=pipeline trainer.devices=2 trainer.num_nodes=2
    """
    from dltrain.cli.compose import compose

    cfg, _ = compose(config, overrides or [])
    _quiet_libraries()
    from dltrain.trainers.plan import make_plan, render_plan

    argv = ([f"--config={config}"] if config else []) + list(overrides or [])
    result = make_plan(cfg, argv)
    typer.echo(json.dumps(result, indent=2) if as_json else render_plan(result))


@app.command(context_settings=OVERRIDES)
@_errors_to_exit_codes
def tune(
    config: ConfigFile = None,
    overrides: Overrides = None,
    no_batch_size: Annotated[
        bool, typer.Option("--no-batch-size", help="Skip the batch-size search.")
    ] = False,
    no_lr: Annotated[
        bool, typer.Option("--no-lr", help="Skip the learning-rate search.")
    ] = False,
    max_trials: Annotated[
        int,
        typer.Option(
            "--max-trials", help="Batch sizes tried: 2, 4, 8, ... (doubling)."
        ),
    ] = 8,
    steps: Annotated[
        int, typer.Option("--steps", help="Training steps per batch-size trial.")
    ] = 3,
    binsearch: Annotated[
        bool,
        typer.Option(
            "--binsearch",
            help="After an out-of-memory bound, bisect between the last size that "
            "fit and the one that did not.",
        ),
    ] = False,
    lr_steps: Annotated[
        int, typer.Option("--lr-steps", help="Learning rates tried (one step each).")
    ] = 100,
    min_lr: Annotated[
        float, typer.Option("--min-lr", help="Smallest learning rate tried.")
    ] = 1e-8,
    max_lr: Annotated[
        float, typer.Option("--max-lr", help="Largest learning rate tried.")
    ] = 1.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print only tune.json on stdout.")
    ] = False,
) -> None:
    """Suggest a batch size and a learning rate with Lightning's tuner (one
    process); write tune.json and lr_find.png into a run directory.

    Example: dltrain tune --max-trials 6 model=rnn data=text
    """
    from dltrain.cli.compose import compose
    from dltrain.trainers.tune import TuneOptions, check

    options = TuneOptions(
        batch_size=not no_batch_size,
        lr=not no_lr,
        max_trials=max_trials,
        steps=steps,
        binsearch=binsearch,
        lr_steps=lr_steps,
        min_lr=min_lr,
        max_lr=max_lr,
    )
    cfg, applied = compose(config, overrides or [])
    check(cfg, options)
    _quiet_libraries()

    from dltrain.trainers.tune import render, run_tune

    argv = ([f"--config={config}"] if config else []) + list(overrides or [])
    run_dir, result = run_tune(cfg, applied, argv, options)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        typer.echo(render(result))
    typer.echo(f"run directory: {run_dir}", err=True)


@config_app.command("show", context_settings=OVERRIDES)
@_errors_to_exit_codes
def config_show(config: ConfigFile = None, overrides: Overrides = None) -> None:
    """Print the composed config as YAML.

    Example: dltrain config show model=rnn data=text
    """
    from omegaconf import OmegaConf

    from dltrain.cli.compose import compose

    cfg, _ = compose(config, overrides or [])
    typer.echo(OmegaConf.to_yaml(cfg, resolve=True), nl=False)


def main() -> None:
    try:
        app()
        code = 0
    except SystemExit as done:
        code = (
            done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        )
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        # Under torchrun/srun this process is a rank: leave like a worker does.
        from dltrain.trainers.worker import leave

        leave(code)
    sys.exit(code)
