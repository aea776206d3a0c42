"""Experiment tracking: the loggers of a fit besides ``logs/metrics.csv``.

``logger=csv`` is Lightning's CSV logger alone (the report's plots and resume
read its file). ``logger=tensorboard`` adds event files in ``<run>/tensorboard``;
``logger=mlflow`` adds an MLflow run. Either one also receives the resolved
config as hyperparameters and, after the test, the report's metrics (and, for
MLflow, the report files as artifacts). Only global rank 0 holds these loggers.

The checks at the top of this module run before any process starts: they
import neither torch nor Lightning nor the tracking libraries.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from dltrain.trainers import rundir
from dltrain.trainers.errors import ConfigError

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
# Schemes MLflow reads through SQLAlchemy, which mlflow-skinny does not install.
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
URI_FIX = (
    "use a writable folder (logger.tracking_uri=file:/abs/path/mlruns), a database "
    "(sqlite:///abs/path/mlflow.db) or a server (http://host:5000)"
)


def check(cfg: DictConfig) -> None:
    """Refuse a logger that cannot work here: its library is missing, or MLflow's
    tracking URI cannot be reached or written.

    Raises:
        ConfigError: naming the key, the value and the fix.
    """
    name = cfg.logger.name
    if name == "csv":
        return
    module = "tensorboard" if name == "tensorboard" else "mlflow"
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"logger={name} needs the {module} package, which is not installed; "
            f"pip install 'dltrain[{name}]' (or use logger=csv)"
        )
    if name == "mlflow":
        check_tracking_uri(tracking_uri(cfg))


def tracking_uri(cfg: DictConfig) -> str:
    """``logger.tracking_uri`` with a local path made absolute; by default a file
    store in ``<run.root>/mlruns``."""
    uri = cfg.logger.tracking_uri
    if not uri:
        return (Path(cfg.run.root).expanduser().resolve() / "mlruns").as_uri()
    parts = urlparse(uri)
    if parts.scheme in ("", "file") and not parts.netloc:
        return Path(parts.path).expanduser().resolve().as_uri()
    return uri


def check_tracking_uri(uri: str) -> None:
    """A file store must be a folder we can write, a database needs SQLAlchemy and
    a writable file, a server must answer; other schemes are MLflow's own."""
    parts = urlparse(uri)
    scheme = parts.scheme.split("+")[0]
    where = f"logger.tracking_uri={uri}"
    if scheme == "file":
        _check_writable(Path(urllib.request.url2pathname(parts.path)), where)
    elif scheme in DATABASES:
        if importlib.util.find_spec("sqlalchemy") is None:
            raise ConfigError(
                f"{where} needs MLflow's database support (SQLAlchemy), which "
                "mlflow-skinny lacks; pip install mlflow, or use a file store or a server"
            )
        if scheme == "sqlite" and parts.path not in ("", "/", "/:memory:"):
            _check_writable(Path(parts.path[1:]).expanduser().resolve().parent, where)
    elif scheme in ("http", "https"):
        _check_server(uri, where)
    elif scheme not in ("databricks", "databricks-uc", "uc", *_plugin_schemes()):
        raise ConfigError(
            f"{where}: MLflow has no store for {scheme!r} URIs; {URI_FIX}"
        )


def _check_writable(path: Path, where: str) -> None:
    """``path`` is a writable folder: made now if it is not there (a fit would
    make it anyway), so that a place no one can write (``/proc``, a read-only
    mount) is refused here rather than halfway through the run."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        reason = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = f"{existing} is not writable"
    else:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".dltrain-write-check-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            return
        except OSError as err:
            reason = f"{err.filename or path}: {err.strerror}"
    raise ConfigError(f"{where} cannot be used ({reason}); {URI_FIX}")


def _check_server(uri: str, where: str) -> None:
    """Ask the server's health endpoint; any HTTP answer means it is there."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
            pass
    except urllib.error.HTTPError:
        return  # it answered (an auth proxy may refuse /health): MLflow will tell
    except (OSError, ValueError) as err:  # URLError and timeouts are OSErrors
        reason = getattr(err, "reason", err)
        raise ConfigError(
            f"{where}: no server answers there ({reason}); start it (mlflow server "
            f"--port ...) or {URI_FIX}"
        ) from None


def _plugin_schemes() -> list[str]:
    """URI schemes that installed MLflow plugins add."""
    return [e.name for e in metadata.entry_points(group="mlflow.tracking_store")]


def hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as flat dotted keys (``optim.lr``, ``model.name``);
    lists become their text."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node) if isinstance(node, list) else node

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return flat


def report_metrics(report: dict[str, Any], split: str = "test") -> dict[str, float]:
    """The report's scalar metrics as ``test/<name>``; undefined ones (null) left out."""
    return {
        f"{split}/{name}": float(value)
        for name, value in report["metrics"].items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class Tracking:
    """The TensorBoard or MLflow logger of one fit, on global rank 0 (elsewhere,
    and for ``logger=csv``, it holds nothing and every call does nothing)."""

    def __init__(self, run_dir: Path, params: dict[str, Any]):
        self.run_dir = run_dir
        self.params = params
        self.tensorboard = None
        self.mlflow = None

    @property
    def loggers(self) -> list[Any]:
        return [x for x in (self.tensorboard, self.mlflow) if x is not None]

    @classmethod
    def start(
        cls, cfg: DictConfig, run_dir: Path, rank_zero: bool, resumed_step: int | None
    ) -> Tracking:
        """Open the logger (continuing the run's own MLflow run and TensorBoard
        folder when ``resumed_step`` is given), record it in the manifest and log
        the config as hyperparameters."""
        tracking = cls(run_dir, hyperparameters(cfg))
        if not rank_zero or cfg.logger.name == "csv":
            return tracking
        if cfg.logger.name == "tensorboard":
            tracking._open_tensorboard(resumed_step)
        else:
            tracking._open_mlflow(cfg, resumed_step is not None)
        return tracking

    def _open_tensorboard(self, resumed_step: int | None) -> None:
        from pytorch_lightning.loggers import TensorBoardLogger

        self.tensorboard = TensorBoardLogger(
            save_dir=self.run_dir,
            name=TENSORBOARD_DIR,
            version="",
            default_hp_metric=False,
        )
        if resumed_step is not None:
            # TensorBoard drops the steps logged after the checkpoint (the part
            # that is trained again) when it reads a session start at this step.
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            start = Event(step=resumed_step, session_log=SessionLog(status=1))
            self.tensorboard.experiment._get_file_writer().add_event(start)
        rundir.update_manifest(
            self.run_dir,
            logger={
                "name": "tensorboard",
                "log_dir": str(self.run_dir / TENSORBOARD_DIR),
            },
        )
        self.tensorboard.log_hyperparams(self.params)

    def _open_mlflow(self, cfg: DictConfig, resumed: bool) -> None:
        from mlflow.exceptions import MlflowException
        from pytorch_lightning.loggers import MLFlowLogger

        record = rundir.read_manifest(self.run_dir).get("logger") or {}
        record = record if resumed and record.get("name") == "mlflow" else {}
        uri = record.get("tracking_uri") or tracking_uri(cfg)
        if urlparse(uri).scheme == "file":
            # MLflow 3 keeps its file store in maintenance mode, behind this switch.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        experiment = cfg.logger.experiment_name or cfg.experiment
        try:
            if not record:
                _ensure_experiment(uri, experiment)
            self.mlflow = MLFlowLogger(
                experiment_name=experiment,
                run_name=cfg.run.name or self.run_dir.name,
                tracking_uri=uri,
                run_id=record.get("run_id"),
            )
            client, run_id = self.mlflow.experiment, self.mlflow.run_id
            if record:
                client.update_run(run_id, status="RUNNING")
        except MlflowException as err:
            first = str(err.message).strip().splitlines()[0]
            raise ConfigError(
                f"logger.tracking_uri={uri}: MLflow cannot use it ({first}); {URI_FIX}"
            ) from None
        rundir.update_manifest(
            self.run_dir,
            logger={
                "name": "mlflow",
                "run_id": run_id,
                "experiment_id": self.mlflow.experiment_id,
                "tracking_uri": uri,
            },
        )
        if record:  # MLflow keeps a parameter's first value; resume changes trainer.*
            logged = client.get_run(run_id).data.params
            self.mlflow.log_hyperparams(
                {k: v for k, v in self.params.items() if k not in logged}
            )
        else:
            self.mlflow.log_hyperparams(self.params)

    def log_report(self, report: dict[str, Any], step: int) -> None:
        """After the test: the report's metrics at the fit's last ``step``; for
        TensorBoard also the report as text and the hyperparameters beside the
        metrics (its HPARAMS tab), for MLflow the report files as artifacts."""
        metrics = report_metrics(report)
        report_md = self.run_dir / "report.md"
        if self.tensorboard is not None:
            self.tensorboard.log_hyperparams(self.params, metrics=metrics, step=step)
            if report_md.is_file():
                self.tensorboard.experiment.add_text(
                    "report", report_md.read_text(), step
                )
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step=step)
            client, run_id = self.mlflow.experiment, self.mlflow.run_id
            for name in (rundir.REPORT, "report.md", rundir.CONFIG):
                if (self.run_dir / name).is_file():
                    client.log_artifact(run_id, str(self.run_dir / name))
            if (self.run_dir / "plots").is_dir():
                client.log_artifacts(run_id, str(self.run_dir / "plots"), "plots")

    def close(self, status: str) -> None:
        """End the logger's run: "FINISHED", "FAILED" or "KILLED" (interrupted).

        A tracking server that fails here is reported, not raised: the run's own
        files are complete, and a failing run keeps its own error."""
        try:
            if self.tensorboard is not None:
                self.tensorboard.finalize(
                    "success" if status == "FINISHED" else "failed"
                )
            if self.mlflow is not None:
                self.mlflow.experiment.set_terminated(self.mlflow.run_id, status)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            log.warning("could not mark the %s run %s: %s", self.name, status, first)

    @property
    def name(self) -> str:
        return "MLflow" if self.mlflow is not None else "TensorBoard"


def _ensure_experiment(uri: str, name: str) -> None:
    """Create the MLflow experiment unless it exists (trials of a sweep running
    at once may race to create it: the loser finds it made)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if client.get_experiment_by_name(name) is not None:
        return
    try:
        client.create_experiment(name)
    except MlflowException:
        if client.get_experiment_by_name(name) is None:
            raise
