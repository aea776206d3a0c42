"""End to end through the real `dltrain` command: fit, eval, DDP, torchrun.

Real data, real Lightning strategies, real gloo process groups on 127.0.0.1.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import dltrain_exe, run_dltrain


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple[Path, object]:
    """The default job, as a newcomer runs it: `dltrain fit` on digits."""
    cwd = tmp_path_factory.mktemp("digits")
    result = run_dltrain("fit", "run.dir=runs/digits", cwd=cwd)
    assert result.code == 0, result
    return cwd / "runs" / "digits", result


def test_default_fit_reaches_095_on_digits(digits_run):
    run_dir, result = digits_run
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task"] == "classification" and report["split"] == "test"
    assert report["num_samples"] == 360
    assert report["metrics"]["accuracy"] >= 0.95
    assert report["metrics"]["auroc"] > 0.99
    assert sum(map(sum, report["confusion_matrix"])) == 360
    assert [row["support"] for row in report["per_class"]] == [
        sum(row) for row in report["confusion_matrix"]
    ]
    diagonal = sum(report["confusion_matrix"][i][i] for i in range(10))
    assert diagonal / 360 == pytest.approx(report["metrics"]["accuracy"])
    assert f"{report['metrics']['accuracy']:.4f}" in result.out  # the terminal table


def test_run_directory_holds_everything(digits_run):
    run_dir, result = digits_run
    for name in (
        "config.yaml",
        "manifest.json",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "logs/metrics.csv",
        "report.json",
        "report.md",
    ):
        assert (run_dir / name).is_file(), name
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["world_size"] == 1
    assert manifest["seed"] == 42 and manifest["overrides"] == ["run.dir=runs/digits"]
    assert manifest["versions"]["torch"] and manifest["versions"]["pytorch-lightning"]
    epochs = {
        line.split(",")[0]
        for line in (run_dir / "logs/metrics.csv").read_text().splitlines()[1:]
    }
    assert len(epochs) == 30
    assert "| accuracy |" in (run_dir / "report.md").read_text()
    # not a terminal: plain progress lines, on stderr, from rank 0
    assert "epoch 30/30" in result.err and "epoch" not in result.out


def test_eval_gives_the_same_report_on_one_and_two_processes(digits_run):
    run_dir, _ = digits_run
    fit_report = json.loads((run_dir / "report.json").read_text())
    one = run_dltrain("eval", str(run_dir), "--json", cwd=run_dir.parent)
    assert one.code == 0, one
    two = run_dltrain(
        "eval",
        str(run_dir),
        "strategy=ddp",
        "trainer.devices=2",
        "--json",
        cwd=run_dir.parent,
    )
    assert two.code == 0, two
    single, ddp = one.json(), two.json()  # stdout holds only the JSON
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    assert single["num_samples"] == ddp["num_samples"] == 360
    assert (
        single["confusion_matrix"]
        == ddp["confusion_matrix"]
        == fit_report["confusion_matrix"]
    )
    for name, value in single["metrics"].items():
        assert ddp["metrics"][name] == pytest.approx(value, abs=1e-6), name
    assert len(list((run_dir / "eval").iterdir())) == 2


def test_eval_from_a_checkpoint_alone(digits_run, tmp_path):
    run_dir, _ = digits_run
    result = run_dltrain(
        "eval", "--ckpt", str(run_dir / "checkpoints/best.ckpt"), cwd=tmp_path
    )
    assert result.code == 0, result
    reports = list(tmp_path.glob("runs/eval/*/report.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    expected = json.loads((run_dir / "report.json").read_text())
    assert report["confusion_matrix"] == expected["confusion_matrix"]


def test_ddp_fit_on_two_processes(dltrain):
    result = dltrain(
        "fit",
        "strategy=ddp",
        "trainer.devices=2",
        "trainer.max_epochs=3",
        "run.dir=ddp",
    )
    assert result.code == 0, result
    report = json.loads((dltrain.cwd / "ddp/report.json").read_text())
    manifest = json.loads((dltrain.cwd / "ddp/manifest.json").read_text())
    assert report["world_size"] == manifest["world_size"] == 2
    assert report["num_samples"] == 360 and report["strategy"] == "ddp"
    assert result.err.count("fit: model=cnn") == 1  # only rank 0 speaks
    assert result.err.count("epoch 3/3 ") == 1


def test_torchrun_ranks_agree_on_one_run_directory(dltrain):
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        dltrain_exe(),
        "fit",
        "strategy=ddp",
        "trainer.max_epochs=2",
        "experiment=trun",
    ]
    proc = subprocess.run(
        cmd, cwd=dltrain.cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((dltrain.cwd / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("trun_")
    report = json.loads((runs[0] / "report.json").read_text())
    assert report["world_size"] == 2 and report["num_samples"] == 360
    assert proc.stdout.count("classification report") == 1


def test_torchrun_with_single_strategy_is_refused(dltrain):
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        dltrain_exe(),
        "fit",
        "trainer.max_epochs=1",
    ]
    proc = subprocess.run(
        cmd, cwd=dltrain.cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert "strategy=single under a launcher that started 2 processes" in proc.stderr
    assert not (dltrain.cwd / "runs").exists()


def test_rnn_reads_digit_rows_and_text_windows(dltrain):
    images = dltrain("fit", "model=rnn", "trainer.max_epochs=3", "run.dir=rows")
    assert images.code == 0, images
    assert (
        json.loads((dltrain.cwd / "rows/report.json").read_text())["metrics"][
            "accuracy"
        ]
        > 0.5
    )

    text = dltrain(
        "fit",
        "model=rnn",
        "data=text",
        "data.train_samples=3000",
        "trainer.max_epochs=1",
        "run.dir=lm",
        "--json",
    )
    assert text.code == 0, text
    report = text.json()
    metrics = report["metrics"]
    assert report["task"] == "language_model" and report["data"] == "pydoc_data.topics"
    assert math.exp(metrics["cross_entropy"]) == pytest.approx(metrics["perplexity"])
    assert metrics["bits_per_char"] == pytest.approx(
        metrics["cross_entropy"] / math.log(2)
    )
    assert 1.0 < metrics["perplexity"] < 60, metrics  # trained a little; no leak (~1)
    assert json.loads((dltrain.cwd / "lm/report.json").read_text()) == report
