"""`logger=tensorboard|mlflow`: what a fit records there, read back by the
tracking libraries themselves, and a resumed run continuing its own records."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
from pathlib import Path

import pytest

from conftest import run_dltrain, start_until

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

SMALL = ["trainer.max_epochs=2", "trainer.progress=plain"]
ENV = {"OMP_NUM_THREADS": "1"}


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _logger_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["logger"]


def _scalar_metrics(report: dict) -> dict[str, float]:
    return {
        f"test/{k}": v for k, v in report["metrics"].items() if isinstance(v, float)
    }


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    events = EventAccumulator(str(folder))
    events.Reload()
    return events


@pytest.fixture
def mlflow_client(monkeypatch):
    """An MLflow client on a run's tracking URI (the file store needs the switch)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return lambda uri: MlflowClient(uri)


def test_tensorboard_records_the_fit_the_report_and_a_resume(dltrain):
    first = dltrain("fit", "logger=tensorboard", "run.dir=tb", *SMALL, env=ENV)
    assert first.code == 0, first
    run_dir = dltrain.cwd / "tb"
    assert _logger_record(run_dir)["log_dir"] == str(run_dir / "tensorboard")
    events = _events(run_dir / "tensorboard")
    scalars = events.Tags()["scalars"]
    assert {"train_loss", "val_loss", "val_acc"} <= set(scalars)
    for tag, value in _scalar_metrics(_report(run_dir)).items():
        assert events.Scalars(tag)[-1].value == pytest.approx(value, rel=1e-6), tag
    # The HPARAMS tab: the config's dotted keys, beside the test metrics.
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["optim.lr"].number_value == pytest.approx(0.001)
    assert start.hparams["model.name"].string_value == "cnn"
    assert "report/text_summary" in events.Tags()["tensors"]

    again = dltrain("fit", "--resume", "tb", "trainer.max_epochs=3", env=ENV)
    assert again.code == 0, again
    events = _events(run_dir / "tensorboard")
    assert len(events.Scalars("val_loss")) == 3  # the same folder, all 3 epochs
    accuracy = events.Scalars("test/accuracy")
    assert accuracy[-1].value == pytest.approx(_report(run_dir)["metrics"]["accuracy"])


def test_mlflow_records_params_metrics_and_report_files(dltrain, mlflow_client):
    result = dltrain("fit", "logger=mlflow", "run.dir=ml", *SMALL, env=ENV)
    assert result.code == 0, result
    run_dir = dltrain.cwd / "ml"
    record = _logger_record(run_dir)
    assert record["tracking_uri"] == (dltrain.cwd / "runs" / "mlruns").as_uri()
    client = mlflow_client(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "ml"
    assert client.get_experiment(run.info.experiment_id).name == "default"
    assert run.data.params["optim.lr"] == "0.001"
    assert run.data.params["model.name"] == "cnn"
    for key, value in _scalar_metrics(_report(run_dir)).items():
        assert run.data.metrics[key] == pytest.approx(value, rel=1e-6), key
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "report.md", "config.yaml", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/confusion_matrix.png" in plots


def test_mlflow_run_interrupted_then_resumed_is_one_run(tmp_path, mlflow_client):
    """SIGTERM marks the MLflow run KILLED; --resume continues the same run."""
    args = ["fit", "logger=mlflow", "run.dir=job", "trainer.max_epochs=4"]
    args += ["data.batch_size=8", "trainer.progress=plain"]
    run_dir = tmp_path / "job"
    proc = start_until(tmp_path, run_dir / "checkpoints/last.ckpt", *args)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.fail("the run ended before the interrupt; make it longer")
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    record = _logger_record(run_dir)
    client = mlflow_client(record["tracking_uri"])
    assert client.get_run(record["run_id"]).info.status == "KILLED"

    again = run_dltrain("fit", "--resume", "job", cwd=tmp_path, env=ENV)
    assert again.code == 0, again
    assert _logger_record(run_dir)["run_id"] == record["run_id"]
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    history = client.get_metric_history(run.info.run_id, "val_loss")
    with (run_dir / "logs/metrics.csv").open() as handle:
        logged = [float(r["val_loss"]) for r in csv.DictReader(handle) if r["val_loss"]]
    assert len(logged) == 4  # both parts, one value per epoch
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        logged
    )
    accuracy = run.data.metrics["test/accuracy"]
    assert accuracy == pytest.approx(_report(run_dir)["metrics"]["accuracy"])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("where", ["server", "file"])
def test_unusable_tracking_uri_is_refused_before_the_run(dltrain, where):
    if where == "server":
        uri = f"http://127.0.0.1:{_closed_port()}"
    else:
        (dltrain.cwd / "blocker").write_text("a file, not a folder")
        uri = (dltrain.cwd / "blocker" / "mlruns").as_uri()
    result = dltrain("fit", "logger=mlflow", f"logger.tracking_uri={uri}", env=ENV)
    assert result.code == 2, result
    assert f"logger.tracking_uri={uri}" in result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1
    assert not (dltrain.cwd / "runs").exists()  # no run folder was made
