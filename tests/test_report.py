"""The evaluation report: undefined metrics, exactness across processes, cv, `report`.

The distributed tests start real gloo process groups on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import dltrain_exe, start_until
from dltrain.data.datamodules import ShardSampler
from dltrain.metrics.tasks import build_metrics, summarize, update_metrics

NAMES = ["a", "b", "c", "d"]


def _report(logits: torch.Tensor, target: torch.Tensor) -> dict:
    metrics = build_metrics("classification", 4, top_k=2, bins=5)
    update_metrics(metrics, logits, target)
    return summarize(metrics.compute(), "classification", NAMES)


def test_auroc_is_undefined_when_the_split_has_one_class():
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    report = _report(logits, torch.tensor([0, 0]))
    assert report["metrics"]["auroc"] is None
    assert any("auroc is undefined" in n and "b, c, d" in n for n in report["notes"])
    rows = {row["class"]: row for row in report["per_class"]}
    assert rows["c"]["recall"] is None and rows["c"]["auroc"] is None
    assert rows["c"]["f1"] is None  # no sample and never predicted
    assert rows["a"]["recall"] == 0.5 and rows["a"]["precision"] == 1.0
    json.dumps(report)  # null, not NaN, in the JSON


def test_precision_is_undefined_for_a_class_never_predicted():
    logits = torch.eye(4)[[0, 1, 2, 2]] * 5  # class d is never predicted
    report = _report(logits, torch.tensor([0, 1, 2, 3]))
    rows = {row["class"]: row for row in report["per_class"]}
    assert rows["d"]["precision"] is None and rows["d"]["recall"] == 0.0
    assert rows["d"]["f1"] == 0.0  # defined: a missed class scores 0
    assert any("precision of class d is undefined" in n for n in report["notes"])
    assert report["metrics"]["accuracy"] == 0.75
    from sklearn.metrics import roc_auc_score

    probs = logits.softmax(-1).numpy()
    expected = roc_auc_score([0, 1, 2, 3], probs, multi_class="ovr", average="macro")
    assert report["metrics"]["auroc"] == pytest.approx(expected, abs=1e-6)


def test_top_k_and_calibration():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 4)
    report = _report(logits, torch.tensor([0, 1, 2, 0]))
    assert report["metrics"]["accuracy"] == 0.5
    assert report["metrics"]["top_k_accuracy"] == 0.75  # top-2: classes a and b
    confidence = logits.softmax(-1)[0, 0].item()
    # one bin holds every sample: |mean confidence - accuracy|
    assert report["metrics"]["calibration_error"] == pytest.approx(
        abs(confidence - 0.5)
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _shard_worker(rank, world, port, n, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(n, 4, generator=generator)
    target = torch.arange(n) % 4
    metrics = build_metrics("classification", 4, top_k=2, bins=5)
    shard = list(ShardSampler(n, rank, world))
    for i in range(0, len(shard), 2):  # batches of 2 over this rank's shard
        update_metrics(metrics, logits[shard[i : i + 2]], target[shard[i : i + 2]])
    if not shard:  # what TaskModule does for a rank with no test batch
        update_metrics(metrics, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    report = summarize(metrics.compute(), "classification", NAMES)
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.mark.parametrize("n", [2, 7, 361])
def test_every_sample_counted_once_on_1_2_and_3_processes(n, tmp_path):
    reports = {}
    for world in (1, 2, 3):
        out = tmp_path / f"world{world}.json"
        mp.spawn(_shard_worker, args=(world, _free_port(), n, str(out)), nprocs=world)
        reports[world] = json.loads(out.read_text())
    for world in (2, 3):
        assert reports[world]["num_samples"] == n
        assert reports[world]["confusion_matrix"] == reports[1]["confusion_matrix"]
        for name, value in reports[1]["metrics"].items():
            if value is None:
                assert reports[world]["metrics"][name] is None, name
            else:
                assert reports[world]["metrics"][name] == pytest.approx(
                    value, abs=1e-6
                ), name


def _dltrain(
    *args: str, cwd: Path, timeout: float = 900
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dltrain_exe(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("cv")
    proc = _dltrain(
        "cv", "--folds", "5", "trainer.max_epochs=10", "run.dir=cv5", cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5-fold cross-validation" in proc.stdout and "±" in proc.stdout
    return cwd / "cv5"


def test_cv_five_folds_on_digits(cv_run):
    report = json.loads((cv_run / "cv_report.json").read_text())
    assert report["folds"] == 5 and len(report["per_fold"]) == 5
    # the folds partition train+val (1797 - 360 test samples), each sample once
    assert sum(row["val_samples"] for row in report["per_fold"]) == 1437
    accuracies = [row["val"]["accuracy"] for row in report["per_fold"]]
    stats = report["metrics"]["accuracy"]
    assert stats["values"] == accuracies
    assert stats["mean"] == pytest.approx(sum(accuracies) / 5)
    assert stats["std"] == pytest.approx(
        float(torch.tensor(accuracies).std(unbiased=False))
    )
    assert stats["mean"] > 0.85 and report["test"]["accuracy"]["mean"] > 0.85
    for fold in range(5):
        fold_dir = cv_run / f"fold-{fold}"
        # the held-out fold never picks the checkpoint it is scored with
        val_report = json.loads((fold_dir / "report_val.json").read_text())
        assert val_report["checkpoint"].endswith("last.ckpt")
        config = (fold_dir / "config.yaml").read_text()
        assert f"fold: {fold}" in config and "folds: 5" in config
        assert json.loads((fold_dir / "report.json").read_text())["num_samples"] == 360
    assert "± " in (cv_run / "cv_report.md").read_text()


def test_report_rerenders_and_compares_runs(cv_run, tmp_path):
    single = _dltrain("report", str(cv_run / "fold-0"), "--json", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    assert json.loads(single.stdout) == json.loads(
        (cv_run / "fold-0/report.json").read_text()
    )
    table = _dltrain("report", str(cv_run / "fold-0"), cwd=tmp_path)
    assert (
        "classification report" in table.stdout and "confusion matrix" in table.stdout
    )
    both = _dltrain(
        "report", str(cv_run / "fold-0"), str(cv_run / "fold-1"), "--json", cwd=tmp_path
    )
    runs = json.loads(both.stdout)["runs"]
    assert [r["measured_on"] for r in runs] == ["test split", "test split"]
    assert [r["run"] for r in runs] == [str(cv_run / "fold-0"), str(cv_run / "fold-1")]
    assert (
        runs[1]["metrics"]["accuracy"]
        == json.loads((cv_run / "fold-1/report.json").read_text())["metrics"][
            "accuracy"
        ]
    )
    side = _dltrain(
        "report", str(cv_run / "fold-0"), str(cv_run), "--json", cwd=tmp_path
    )
    measured = [r["measured_on"] for r in json.loads(side.stdout)["runs"]]
    assert measured == ["test split", "5-fold cv mean, held-out folds"]
    cv_table = _dltrain("report", str(cv_run), cwd=tmp_path)
    assert "5-fold cross-validation" in cv_table.stdout


def test_plots_are_written_and_embedded(cv_run):
    fold = cv_run / "fold-0"
    markdown = (fold / "report.md").read_text()
    for header in [
        line for line in markdown.splitlines() if line.startswith("| class")
    ]:
        below = markdown.splitlines()[markdown.splitlines().index(header) + 1]
        assert header.count("|") == below.count("|")  # a table Markdown renders
    for name in ("confusion_matrix", "roc", "history"):
        png = fold / "plots" / f"{name}.png"
        assert (
            png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        )
        assert f"](plots/{name}.png)" in markdown


def test_interrupted_cv_continues_with_the_missing_folds(tmp_path):
    args = ["cv", "--folds", "3", "trainer.max_epochs=40", "run.dir=cvi"]
    first = tmp_path / "cvi/fold-0/report_val.json"
    proc = start_until(tmp_path, first, *args)
    time.sleep(2)  # fold 1 is training now
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    kept = first.stat().st_mtime_ns
    assert not (tmp_path / "cvi/cv_report.json").exists()

    again = _dltrain(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fold 0 (1 of 3): finished earlier, kept" in again.stderr
    assert "fold 1 (2 of 3): training" in again.stderr
    assert first.stat().st_mtime_ns == kept
    assert list(tmp_path.glob("cvi/fold-1.interrupted-*"))  # set aside, not deleted
    assert json.loads((tmp_path / "cvi/cv_report.json").read_text())["folds"] == 3


def _write_report(path: Path, task: str) -> Path:
    path.mkdir(parents=True)
    metrics = {"accuracy": 0.5} if task == "classification" else {"perplexity": 7.0}
    (path / "report.json").write_text(json.dumps({"task": task, "metrics": metrics}))
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["cv", "--folds", "1"], "--folds 1: cross-validation needs at least 2 folds"),
        # digit 8 has 174 samples; 80% of them (139) lie outside the test split
        (["cv", "--folds", "500"], "is more than the 139 samples of the rarest class"),
        (
            ["cv", "--folds", "3", "model=rnn", "data=text"],
            "dltrain cv needs a classification",
        ),
        (["report", "empty"], "has no report (report.json or cv_report.json)"),
        (["report", "lm", "clf"], "cannot compare runs of different tasks"),
    ],
)
def test_cv_and_report_bad_input(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    _write_report(tmp_path / "lm", "language_model")
    _write_report(tmp_path / "clf", "classification")
    proc = _dltrain(*args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_a_cv_folder_in_use_is_refused(tmp_path):
    import fcntl

    (tmp_path / "busy").mkdir()
    with (tmp_path / "busy/.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running cv holds it
        proc = _dltrain("cv", "--folds", "2", "run.dir=busy", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "is in use by another dltrain cv" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == [".lock"]
