"""`dltrain cv`: stratified K-fold cross-validation, one run per fold.

The test split is held out as in any run; the rest (train + val) is cut into K
stratified folds. Each fold is an ordinary run, launched like `dltrain fit`,
whose config carries its fold index, so every rank of a fold agrees on it. An
interrupted cv continues with the folds that have no report yet.
"""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dltrain.trainers import rundir
from dltrain.trainers.errors import ConfigError

CV_MANIFEST = "cv.json"
CV_REPORT = "cv_report.json"


def check_folds(cfg: DictConfig, folds: int) -> None:
    """Refuse a fold count that cannot work, before anything starts."""
    from dltrain.data import readers
    from dltrain.data.splits import smallest_class_in_pool

    if cfg.data.name not in ("digits", "mnist"):
        raise ConfigError(
            f"dltrain cv needs a classification data set; data={cfg.data.name} is "
            "not one: use data=digits or data=mnist"
        )
    if folds < 2:
        raise ConfigError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if cfg.data.name == "digits":
        labels = readers.load_digits().labels
    else:
        if not cfg.data.root:
            raise ConfigError("data=mnist needs data.root: a folder of MNIST IDX files")
        labels = readers.load_mnist(Path(cfg.data.root)).labels
    rarest = smallest_class_in_pool(labels, cfg.data.test_fraction, cfg.seed)
    if folds > rarest:
        raise ConfigError(
            f"--folds {folds} is more than the {rarest} samples of the rarest class "
            f"in train+val; use --folds {rarest} or fewer"
        )


def cv_dir(cfg: DictConfig, folds: int, sha: str) -> Path:
    """The parent folder: a new one, or an unfinished cv of the same config to continue."""
    if cfg.run.dir:
        path = Path(cfg.run.dir).expanduser()
        manifest = path / CV_MANIFEST
        if manifest.is_file():
            saved = json.loads(manifest.read_text())
            if saved.get("config_sha256") != sha or saved.get("folds") != folds:
                raise ConfigError(
                    f"run.dir={path} holds a cv of another config or fold count; "
                    "choose another run.dir, or repeat that cv's own command to continue it"
                )
            return path.resolve()
        if (path / rundir.CONFIG).exists():
            raise ConfigError(
                f"run.dir={path} already holds a run; choose another run.dir"
            )
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = (
            Path(cfg.run.root).expanduser()
            / f"{cfg.run.name or cfg.experiment}_cv_{stamp}"
        )
    return rundir.make_folder(path)


def run_cv(
    cfg: DictConfig, overrides: list[str], folds: int
) -> tuple[Path, dict[str, Any]]:
    """Run every unfinished fold, then write and return the aggregate report."""
    from dltrain.metrics.aggregate import summarize_folds
    from dltrain.metrics.render import cv_markdown
    from dltrain.trainers.launch import launcher_env

    if launcher_env() is not None:
        raise ConfigError(
            "dltrain cv starts its own processes; run it without torchrun/srun "
            "(strategy=ddp trainer.devices=N runs each fold on N processes)"
        )
    check_folds(cfg, folds)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    sha = hashlib.sha256(f"{text}folds={folds}".encode()).hexdigest()
    parent = cv_dir(cfg, folds, sha)
    lock = _lock(parent)  # held until the folds are done or this process ends
    if not (parent / CV_MANIFEST).is_file():
        (parent / rundir.CONFIG).write_text(text)
        manifest = {"folds": folds, "config_sha256": sha, "overrides": overrides}
        rundir.write_json(parent / CV_MANIFEST, {**manifest, "status": "running"})
    try:
        results = _run_folds(cfg, overrides, folds, parent)
    except BaseException:
        _set_status(parent, "stopped")
        raise
    finally:
        lock.close()

    report = {**summarize_folds(results), "run_dir": str(parent)}
    rundir.write_json(parent / CV_REPORT, report)
    (parent / "cv_report.md").write_text(cv_markdown(report))
    _set_status(parent, "finished")
    return parent, report


def _run_folds(
    cfg: DictConfig, overrides: list[str], folds: int, parent: Path
) -> list[dict[str, Any]]:
    from dltrain.trainers.launch import start, with_values

    results = []
    for fold in range(folds):
        fold_dir = parent / f"fold-{fold}"
        name = f"fold {fold} ({fold + 1} of {folds})"
        done = (fold_dir / rundir.REPORT).is_file()
        if done and (fold_dir / "report_val.json").is_file():
            _say(f"{name}: finished earlier, kept")
        else:
            if fold_dir.exists():  # interrupted: keep it aside, run the fold again
                stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
                fold_dir.rename(parent / f"fold-{fold}.interrupted-{stamp}")
            values = {"data.fold": fold, "data.folds": folds, "run.dir": str(fold_dir)}
            _say(f"{name}: training")
            fold_overrides = [*overrides, f"data.fold={fold}", f"data.folds={folds}"]
            start(with_values(cfg, values), fold_overrides, "fit", rundir.new_run_dir)
        val = json.loads((fold_dir / "report_val.json").read_text())
        test = json.loads((fold_dir / rundir.REPORT).read_text())
        _say(
            f"{name}: held-out accuracy {val['metrics']['accuracy']:.4f}, "
            f"test accuracy {test['metrics']['accuracy']:.4f}"
        )
        results.append(
            {"fold": fold, "run_dir": str(fold_dir), "val": val, "test": test}
        )
    return results


def _lock(parent: Path):
    """An exclusive lock on the cv folder, so two cv processes never share it."""
    import fcntl

    handle = (parent / ".lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(
            f"run.dir={parent} is in use by another dltrain cv; wait for it to end"
        ) from None
    return handle


def _set_status(parent: Path, status: str) -> None:
    manifest = json.loads((parent / CV_MANIFEST).read_text())
    rundir.write_json(parent / CV_MANIFEST, {**manifest, "status": status})


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
