"""End to end through the real `dltrain` command: fit, eval, DDP, torchrun.

Real data, real Lightning strategies, real gloo process groups on 127.0.0.1.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import dltrain_exe, run_dltrain, start_until


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc: int, *args: str) -> list[str]:
    """`torchrun` on this machine, rendezvous on 127.0.0.1, running `dltrain ARGS`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        dltrain_exe(),
        *args,
    ]


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
    cmd = _torchrun(2, "fit", "strategy=ddp", "trainer.max_epochs=2", "experiment=trun")
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
    cmd = _torchrun(2, "fit", "trainer.max_epochs=1")
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


def test_srun_ranks_agree_on_one_run_directory(dltrain):
    """Two processes started as srun would start them (SLURM's variables set by
    hand: there is no SLURM on this machine), rendezvous on 127.0.0.1."""
    slurm = {
        "SLURM_JOB_ID": str(_free_port()),
        "SLURM_JOB_NAME": "dltrain-test",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
    }
    args = [
        dltrain_exe(),
        "fit",
        "strategy=ddp",
        "trainer.max_epochs=1",
        "experiment=srun",
    ]
    procs = [
        subprocess.Popen(
            args,
            cwd=dltrain.cwd,
            env={
                **os.environ,
                **slurm,
                "SLURM_PROCID": str(r),
                "SLURM_LOCALID": str(r),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], (
        outputs[0][1][-2000:] + outputs[1][1][-2000:]
    )
    runs = list((dltrain.cwd / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("srun_")
    assert json.loads((runs[0] / "report.json").read_text())["world_size"] == 2
    assert "classification report" in outputs[0][0] and outputs[1][0] == ""


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


def _start_long_fit(cwd: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    """A fit long enough to stop by hand, once its first checkpoint exists."""
    args = ["fit", "trainer.max_epochs=1000", f"run.dir={run_dir}", *extra]
    return start_until(cwd, run_dir / "checkpoints" / "last.ckpt", *args)


@pytest.mark.parametrize(
    "strategy", [["strategy=single"], ["strategy=ddp", "trainer.devices=2"]]
)
def test_ctrl_c_stops_every_process_and_says_so(dltrain, strategy):
    run_dir = dltrain.cwd / "interrupted"
    proc = _start_long_fit(dltrain.cwd, run_dir, *strategy)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted by SIGINT" in err and "Traceback" not in err
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    time.sleep(1)
    assert _processes_mentioning(str(run_dir)) == []


def test_killing_the_launcher_ends_its_workers(dltrain):
    run_dir = dltrain.cwd / "orphans"
    proc = _start_long_fit(dltrain.cwd, run_dir, "strategy=ddp", "trainer.devices=2")
    assert len(_processes_mentioning(str(run_dir))) == 3  # the launcher and 2 workers
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while _processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_mentioning(str(run_dir)) == []


def test_eval_on_three_processes_matches_one(digits_run, tmp_path):
    """360 test samples over 3 ranks (120 each) under torchrun: the same report."""
    run_dir, _ = digits_run
    expected = json.loads((run_dir / "report.json").read_text())
    cmd = _torchrun(3, "eval", str(run_dir), "strategy=ddp", "--json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # rank 0 alone prints
    assert report["world_size"] == 3 and report["num_samples"] == 360
    assert report["confusion_matrix"] == expected["confusion_matrix"]
    for name, value in expected["metrics"].items():
        assert report["metrics"][name] == pytest.approx(value, abs=1e-6), name


def test_a_diverging_loss_stops_the_run_before_any_checkpoint(dltrain):
    result = dltrain(
        "fit", "optim.name=sgd", "optim.lr=1e6", "trainer.max_epochs=2", "run.dir=nan"
    )
    assert result.code == 1, result
    assert "the training loss became nan at step" in result.err
    assert (
        "lower optim.lr (now 1000000.0)" in result.err and "Traceback" not in result.err
    )
    assert not (dltrain.cwd / "nan/checkpoints").exists()
    manifest = json.loads((dltrain.cwd / "nan/manifest.json").read_text())
    assert manifest["status"] == "failed" and "loss became nan" in manifest["error"]


def test_sigterm_to_the_launcher_stops_a_ddp_run(dltrain):
    """What a scheduler does before a time limit: SIGTERM to the job's process."""
    run_dir = dltrain.cwd / "terminated"
    proc = _start_long_fit(dltrain.cwd, run_dir, "strategy=ddp", "trainer.devices=2")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    time.sleep(1)
    assert _processes_mentioning(str(run_dir)) == []
