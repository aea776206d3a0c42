"""`dltrain tune`: Lightning's batch-size scaling and learning-rate finder.

One process only: Lightning's tuner does not scale the batch size across
processes. The batch size is searched first (power mode: 2, 4, 8, ... until
out of memory, ``max_trials`` or the training split); the learning rate is then
searched at the batch size found, so the two suggestions belong together.

On a CPU nothing runs out of memory: the search is bounded by ``max_trials``
and the training split, and the output says which bound stopped it.

Lightning writes a temporary checkpoint (``.scale_batch_size_*.ckpt``,
``.lr_find_*.ckpt``) into the trainer's root folder; here that is a scratch
folder outside the user's, removed when the tuning ends, whatever happens.

Torch-free at import: the checks run before Lightning is loaded.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dltrain.trainers import rundir
from dltrain.trainers.errors import ConfigError

log = logging.getLogger(__name__)

TUNE = "tune.json"
PLOT = "lr_find.png"
# Lightning's suggestion skips the first 10 and the last point of the curve and
# needs 2 more: fewer steps than this leave too little curve to judge.
MIN_LR_STEPS = 20
# Overrides that the suggestions replace, or that name one run's folder.
REPLACED = ("data.batch_size", "optim.lr", "run.dir", "run.name")


@dataclass(frozen=True)
class TuneOptions:
    """What to search and how far (the command's options)."""

    batch_size: bool = True
    lr: bool = True
    max_trials: int = 8
    steps: int = 3
    binsearch: bool = False
    lr_steps: int = 100
    min_lr: float = 1e-8
    max_lr: float = 1.0


def check(cfg: DictConfig, options: TuneOptions) -> None:
    """Refuse what the tuner cannot do, before any folder or model is made."""
    if not options.batch_size and not options.lr:
        raise ConfigError(
            "--no-batch-size and --no-lr skip both searches: nothing to do; "
            "drop one of them"
        )
    t = cfg.trainer
    if cfg.strategy.name != "single" or t.devices * t.num_nodes > 1:
        raise ConfigError(
            f"dltrain tune runs one process (strategy=single, trainer.devices=1), but "
            f"got strategy={cfg.strategy.name} trainer.devices={t.devices} "
            f"trainer.num_nodes={t.num_nodes}: Lightning's tuner does not scale the "
            "batch size across processes; tune with strategy=single trainer.devices=1 "
            "trainer.num_nodes=1 (data.batch_size is per process, so the suggestion "
            "holds for each process of a multi-process run)"
        )
    from dltrain.trainers.launch import check_data, launcher_env

    check_data(cfg)  # a missing data file is refused before the run folder is made
    launched = launcher_env()
    if launched is not None and launched["world_size"] > 1:
        raise ConfigError(
            f"dltrain tune runs in one process, but it was started as one of "
            f"{launched['world_size']} (torchrun or srun); run it without a launcher"
        )
    if options.max_trials < 1:
        raise ConfigError(
            f"--max-trials {options.max_trials}: give at least 1 (e.g. --max-trials 8)"
        )
    if options.steps < 1:
        raise ConfigError(f"--steps {options.steps}: give at least 1 (e.g. --steps 3)")
    if options.lr_steps < MIN_LR_STEPS:
        raise ConfigError(
            f"--lr-steps {options.lr_steps} leaves too little loss curve to suggest "
            f"a learning rate; give at least {MIN_LR_STEPS} (e.g. --lr-steps 100)"
        )
    if not 0 < options.min_lr < options.max_lr:
        raise ConfigError(
            f"--min-lr {options.min_lr} and --max-lr {options.max_lr}: the search "
            "needs 0 < min < max (e.g. --min-lr 1e-6 --max-lr 1)"
        )


def run_tune(
    cfg: DictConfig, overrides: list[str], argv: list[str], options: TuneOptions
) -> tuple[Path, dict[str, Any]]:
    """Search, write ``tune.json`` and ``lr_find.png`` into a new run directory;
    return the directory and the suggestions.

    ``overrides`` go to the manifest; ``argv`` (the user's --config and
    overrides) is repeated in the suggested sweep command.
    """
    check(cfg, options)

    run_dir = rundir.new_run_dir(_named(cfg))
    rundir.write_run(run_dir, cfg, overrides, world_size=1, job="tune")
    say(f"tune: run directory {run_dir}")

    try:
        result = _search(cfg, options, run_dir)
        result.update(_commands(cfg, argv, result))
        result["run_dir"] = str(run_dir)
        rundir.write_json(run_dir / TUNE, result)
    except BaseException as err:
        rundir.update_manifest(
            run_dir,
            status="failed",
            error=_first_line(err) or type(err).__name__,
            finished_at=rundir.finished_at(),
        )
        raise
    rundir.update_manifest(run_dir, status="finished", finished_at=rundir.finished_at())
    return run_dir, result


def _named(cfg: DictConfig) -> DictConfig:
    """``cfg`` for naming the folder: ``<run.root>/tune_<time>`` unless run.dir
    or run.name say otherwise."""
    if cfg.run.dir or cfg.run.name:
        return cfg
    named = copy.deepcopy(cfg)
    OmegaConf.set_readonly(named, False)
    named.run.name = "tune"
    return named


def _search(cfg: DictConfig, options: TuneOptions, run_dir: Path) -> dict[str, Any]:
    """Build the data, the model and a trainer; run the searches asked for."""
    import pytorch_lightning as pl
    from pytorch_lightning.tuner import Tuner

    from dltrain.trainers.run import build_datamodule, build_module, build_trainer

    start = time.monotonic()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = build_datamodule(cfg)
    info = datamodule.info
    train_size = info.sizes["train"]

    module = build_module(cfg, info)
    recorder = _Recorder(module)

    # Lightning's temporary checkpoints go into the trainer's root folder: a
    # scratch folder, never the user's, removed however the search ends.
    with tempfile.TemporaryDirectory(prefix="dltrain-tune-") as scratch:

        def new_tuner() -> Tuner:
            """A fresh trainer for each search (and each retry)."""
            trainer = build_trainer(cfg, Path(scratch), module.monitor, log=False)
            # Enough epochs for every step asked for, however small an epoch is.
            trainer.fit_loop.max_epochs = max(options.lr_steps, options.steps) + 1
            return Tuner(trainer)

        device = _device(cfg)
        say(
            f"tune: model={cfg.model.name}, data={cfg.data.name} (train {train_size}), "
            f"{device}, one process"
        )

        result: dict[str, Any] = {
            "model": _name(cfg.model.name),
            "data": _name(cfg.data.name),
            "device": device,
            "batch_size": None,
            "lr": None,
        }
        batch_size = cfg.data.batch_size
        if options.batch_size:
            found = _scale(
                new_tuner(), module, datamodule, recorder, options, train_size
            )
            found["device"] = device
            found["config"] = cfg.data.batch_size
            result["batch_size"] = found
            batch_size = found["suggested"]
            say(f"tune: batch size search done in {rundir.elapsed(start)}")

        if options.lr:
            # The learning rate is searched at the batch size it will train with.
            datamodule.batch_size = batch_size
            result["lr"] = _find_lr(
                new_tuner, module, datamodule, recorder, options, run_dir
            )
            result["lr"].update(
                batch_size=batch_size,
                batch_size_from="suggested" if options.batch_size else "config",
                config=cfg.optim.lr,
                optimizer=_name(cfg.optim.name),
            )
            say(f"tune: learning rate search done in {rundir.elapsed(start)}")
    recorder.remove()
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


def _name(value: Any) -> str:
    """A config choice as text (the schema's choices are enums)."""
    return str(getattr(value, "value", value))


def _device(cfg: DictConfig) -> str:
    """What ``trainer.accelerator`` resolves to on this machine."""
    import torch

    accelerator = cfg.trainer.accelerator.value
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return accelerator


class _Recorder:
    """Notes each training forward's batch size and learning rate: which batch
    sizes Lightning's scaling really ran, and where a learning rate diverged."""

    def __init__(self, module):
        self.module = module
        self.sizes: list[int] = []
        self.lrs: list[float] = []
        self.handle = module.register_forward_pre_hook(self._note)

    def _note(self, module, args) -> None:
        if not module.training or not args:
            return
        self.sizes.append(len(args[0]))
        optimizers = module.trainer.optimizers if module._trainer else []
        if optimizers:
            self.lrs.append(float(optimizers[0].param_groups[0]["lr"]))

    def clear(self) -> None:
        self.sizes.clear()
        self.lrs.clear()

    def remove(self) -> None:
        self.handle.remove()


def _scale(tuner, module, datamodule, recorder, options, train_size):
    """Power scaling (then, after an out-of-memory bound, optionally a binary
    search); the suggestion never exceeds the training split."""
    cap = 2 ** int(math.log2(train_size)) if train_size >= 1 else 1
    start = min(2, cap)
    # Lightning builds the first trial's loader before it sets init_val: without
    # this, its first trial would run the config's batch size instead of 2.
    datamodule.batch_size = start
    recorder.clear()
    found = tuner.scale_batch_size(
        module,
        datamodule=datamodule,
        mode="power",
        steps_per_trial=options.steps,
        init_val=start,
        max_trials=options.max_trials,
        # Stops the doubling once the largest power of two in the split has run.
        max_val=2 * cap,
    )
    tried = sorted(set(recorder.sizes))
    if not tried:
        raise RuntimeError("the batch size search ran no training step")
    largest = tried[-1]
    method = "power"
    failed = None
    if found is not None and found < largest:
        # The largest size tried did not finish: out of memory.
        failed, suggested = largest, found
        bound = "memory"
    else:
        suggested = largest  # Lightning may return a doubled size it never ran
        if largest >= cap:
            bound = "training split"
        elif len(tried) >= options.max_trials:
            bound = "max_trials"
        else:
            bound = "lightning limit"
    if options.binsearch and failed is not None:
        recorder.clear()
        refined = tuner.scale_batch_size(
            module,
            datamodule=datamodule,
            mode="binsearch",
            steps_per_trial=options.steps,
            init_val=suggested,
            max_trials=options.max_trials,
            max_val=2 * cap,
        )
        if refined:
            suggested, method = min(refined, cap), "power+binsearch"
            tried = sorted(set(tried) | set(recorder.sizes))
    return {
        "suggested": min(suggested, train_size),
        "method": method,
        "bound": bound,
        "largest_tried": largest,
        "failed": failed,
        "tried": tried,
        "train_size": train_size,
        "max_trials": options.max_trials,
        "steps_per_trial": options.steps,
        "binsearch": _binsearch_note(options.binsearch, failed),
    }


def _binsearch_note(asked: bool, failed: int | None) -> str:
    if not asked:
        return "not asked (--binsearch refines an out-of-memory bound)"
    if failed is None:
        return "skipped: no out-of-memory bound to refine"
    return "ran"


def _find_lr(new_tuner, module, datamodule, recorder, options, run_dir):
    """Lightning's LR range test, its suggestion, its curve and its plot."""
    from dltrain.trainers.module import LossDiverged

    recorder.clear()
    tuner = new_tuner()
    raw = _RawLosses(module)
    try:
        finder = tuner.lr_find(
            module,
            datamodule=datamodule,
            min_lr=options.min_lr,
            max_lr=options.max_lr,
            num_training=options.lr_steps,
            update_attr=False,
        )
    except LossDiverged:
        # Lightning stops when the smoothed loss grows 4-fold; a loss that is
        # infinite at once stops our module first.
        at = recorder.lrs[-1] if recorder.lrs else options.min_lr
        raise ConfigError(
            f"the loss became infinite at lr {at:.3g}, {len(recorder.lrs)} steps into "
            f"the learning-rate search; search below it, e.g. --max-lr {at / 10:.2g} "
            f"(now --min-lr {options.min_lr:g} --max-lr {options.max_lr:g})"
        ) from None
    finally:
        raw.remove()
    raw.correct(finder)
    suggested = _steepest(finder)
    lrs, losses = finder.results["lr"], finder.results["loss"]
    _plot(finder, run_dir / PLOT)
    return {
        "suggested": None if suggested is None else float(suggested),
        "min_lr": options.min_lr,
        "max_lr": options.max_lr,
        "steps": options.lr_steps,
        "steps_run": len(lrs),
        "stopped_early": len(lrs) < options.lr_steps,
        "curve": [
            {"lr": float(lr), "loss": _finite(loss)}
            for lr, loss in zip(lrs, losses, strict=True)
        ],
        "plot": PLOT,
    }


class _RawLosses:
    """Each LR-search step's own loss, to smooth the curve again.

    Lightning 2.6's finder smooths with ``beta`` but corrects the bias with the
    step count after the step (``global_step`` is already one ahead), so its
    first points are about half the true loss: the curve begins with a false
    climb, which can draw the steepest-descent suggestion onto a plateau.
    The finder runs with its own callbacks only, so the losses are taken from
    the module's training step.
    """

    def __init__(self, module, beta: float = 0.98):
        self.module = module
        self.beta = beta
        self.losses: list[float] = []
        step = module.training_step

        def training_step(*args, **kwargs):
            out = step(*args, **kwargs)
            loss = out.get("loss") if isinstance(out, dict) else out
            if loss is not None:
                self.losses.append(float(loss))
            return out

        module.training_step = training_step

    def remove(self) -> None:
        del self.module.training_step  # the class's own again

    def correct(self, finder) -> None:
        """Replace the finder's curve with one smoothed from step 1."""
        if len(self.losses) != len(finder.results["loss"]):
            return  # not one loss per point: leave Lightning's curve as it is
        average, smoothed = 0.0, []
        for step, loss in enumerate(self.losses, start=1):
            average = self.beta * average + (1 - self.beta) * loss
            smoothed.append(average / (1 - self.beta**step))
        finder.results["loss"] = smoothed


def _steepest(finder, skip_begin: int = 10, skip_end: int = 1) -> float | None:
    """The learning rate where the smoothed loss falls fastest per decade of
    learning rate (Leslie Smith's range test). Lightning 2.6's own suggestion
    takes the slope per unit of learning rate, which the noise among the tiny
    first rates outweighs; the same points are skipped at both ends."""
    import numpy as np

    losses = np.asarray(finder.results["loss"], dtype=float)
    lrs = np.asarray(finder.results["lr"], dtype=float)
    kept = np.arange(len(losses))[skip_begin : len(losses) - skip_end]
    kept = kept[np.isfinite(losses[kept])]
    if len(kept) < 2:
        finder._optimal_idx = None
        return None
    slopes = np.gradient(losses[kept], np.log10(lrs[kept]))
    finder._optimal_idx = int(kept[int(np.argmin(slopes))])  # what plot() marks
    return float(lrs[finder._optimal_idx])


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None  # JSON has no NaN


def _plot(finder, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = finder.plot(suggest=False)  # Lightning's own mark is its suggestion
    axes = figure.axes[0]
    if finder._optimal_idx is not None:  # ours (see _steepest)
        at = finder._optimal_idx
        axes.plot(
            finder.results["lr"][at],
            finder.results["loss"][at],
            "o",
            color="red",
            ms=10,
        )
    axes.set_title("Learning-rate range test (red: the suggestion)")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def _commands(
    cfg: DictConfig, argv: list[str], result: dict[str, Any]
) -> dict[str, Any]:
    """The override line for the suggestions, and a sweep around them."""
    found, lr = result["batch_size"], result["lr"]
    batch_size = found["suggested"] if found else cfg.data.batch_size
    center = lr["suggested"] if lr and lr["suggested"] is not None else None
    parts = []
    if found:
        parts.append(f"data.batch_size={batch_size}")
    if center is not None:
        parts.append(f"optim.lr={_short(center)}")
    around = center if center is not None else cfg.optim.lr
    keep = [a for a in argv if not a.lstrip("+~").startswith(REPLACED)]
    # Steepest descent sits close to where the loss blows up: sweep below it.
    grid = ",".join(_short(around * f) for f in (1 / 10, 1 / 3, 1))
    sweep = ["dltrain", "sweep", *keep, f"optim.lr={grid}"]
    sweep.append(f"data.batch_size={batch_size}")
    return {"overrides": " ".join(parts), "sweep": " ".join(sweep)}


def _short(value: float) -> str:
    return f"{value:.2g}"


def render(result: dict[str, Any]) -> str:
    """The suggestions as plain lines."""
    lines = []
    found, lr = result["batch_size"], result["lr"]
    if found:
        tried = found["tried"]
        shown = ", ".join(map(str, tried if len(tried) <= 4 else tried[:2]))
        if len(tried) > 4:
            shown += f", ..., {tried[-1]}"
        lines.append(
            f"batch size: {found['suggested']} ({found['method']} scaling, "
            f"{found['steps_per_trial']} steps per trial; tried {shown})"
        )
        lines.append("  " + _bound_text(found))
        if found["binsearch"].startswith("skipped"):
            lines.append(f"  --binsearch {found['binsearch']}")
        elif found["binsearch"] != "ran" and found["failed"] is not None:
            lines.append("  (--binsearch would refine it between the two)")
    if lr:
        where = (
            "the suggested batch size"
            if lr["batch_size_from"] == "suggested"
            else "the config's batch size"
        )
        searched = (
            f"{lr['steps_run']} steps from {lr['min_lr']:.3g} to {lr['max_lr']:.3g}"
        )
        if lr["suggested"] is None:
            lines.append(
                f"learning rate: no suggestion ({searched}: too few finite losses; "
                "raise --lr-steps or narrow --min-lr/--max-lr)"
            )
        else:
            lines.append(
                f"learning rate: {_short(lr['suggested'])} (steepest loss descent, "
                f"{searched}, at batch size {lr['batch_size']}: {where}; "
                f"config has {lr['config']})"
            )
        lines.append(f"  loss curve: {Path(result['run_dir']) / lr['plot']}")
    if result["overrides"]:
        lines.append(f"overrides: {result['overrides']}")
    lines.append(f"sweep: {result['sweep']}")
    return "\n".join(lines)


def _bound_text(found: dict[str, Any]) -> str:
    bound = found["bound"]
    if bound == "memory":
        return (
            f"batch size {found['failed']} ran out of memory; {found['suggested']} fit"
        )
    no_oom = f"no out-of-memory on {found['device']}"
    if bound == "training split":
        why = f"the training split ({found['train_size']} samples)"
    elif bound == "max_trials":
        why = f"--max-trials {found['max_trials']}"
    else:
        why = "Lightning's largest batch size"
    return f"largest tried, bounded by {why}; {no_oom}"


def say(text: str) -> None:
    """Progress on stderr (one process: it is rank 0)."""
    print(text, file=sys.stderr, flush=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""
