"""Several nodes, simulated on one machine: one `scripts/torchrun.sh` per node.

Each "node" is its own torchrun agent, started by the script as a user starts it
on every machine of a cluster; the agents meet through torchrun's c10d
rendezvous on 127.0.0.1, and global rank 0 makes the one run directory.
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

from conftest import REPO, dltrain_exe, processes_mentioning

SCRIPT = REPO / "scripts" / "torchrun.sh"
TINY = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "report.plots=false",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_all(text: str) -> None:
    """SIGKILL every process whose command line holds ``text`` (agents, workers)."""
    for pid in processes_mentioning(text):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run_nodes(
    cwd: Path, nnodes: int, nproc: int, *args: str, timeout: float = 300
) -> tuple[list[subprocess.CompletedProcess], Path]:
    """Start `scripts/torchrun.sh NNODES NPROC 127.0.0.1:PORT ARGS` once per node,
    runs under ``cwd/runs``, and wait for every node; returns the nodes' results
    and the runs folder. A hang past ``timeout`` kills every process and fails."""
    port = _free_port()
    runs = cwd / "runs"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DLTRAIN": dltrain_exe(),
        "RDZV_ID": f"test-{port}",
        "RDZV_TIMEOUT": "120",
    }
    env.pop("COLUMNS", None)
    cmd = [str(SCRIPT), str(nnodes), str(nproc), f"127.0.0.1:{port}", *args]
    cmd.append(f"run.root={runs}")
    nodes = [
        subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for _ in range(nnodes)
    ]
    deadline = time.monotonic() + timeout
    done = []
    try:
        for node in nodes:
            out, err = node.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(cmd, node.returncode, out, err))
    except subprocess.TimeoutExpired:
        _kill_all(f"run.root={runs} ")  # the agents and their workers
        tails = [node.communicate()[1][-2000:] for node in nodes]
        pytest.fail(
            f"{nnodes} nodes still running after {timeout} s:\n" + "\n".join(tails)
        )
    except BaseException:
        _kill_all(f"run.root={runs} ")
        raise
    return done, runs


def _one_run(runs: Path, experiment: str) -> Path:
    found = list(runs.iterdir())
    assert len(found) == 1 and found[0].name.startswith(f"{experiment}_"), found
    return found[0]


def _assert_all_exited_zero(nodes: list[subprocess.CompletedProcess]) -> None:
    assert [n.returncode for n in nodes] == [0] * len(nodes), "\n".join(
        n.stderr[-3000:] for n in nodes
    )


def test_two_nodes_train_one_ddp_run(tmp_path):
    nodes, runs = _run_nodes(tmp_path, 2, 1, "strategy=ddp", *TINY, "experiment=nodes")
    _assert_all_exited_zero(nodes)
    run_dir = _one_run(runs, "nodes")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["strategy"] == "ddp"
    assert manifest["world_size"] == 2
    assert (manifest["num_nodes"], manifest["devices"]) == (2, 1)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["world_size"] == 2 and report["num_samples"] == 360
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    # Only global rank 0, on one of the nodes, prints the report.
    assert sum(n.stdout.count("classification report") for n in nodes) == 1
    assert processes_mentioning(f"run.root={runs} ") == []


def test_two_nodes_of_two_processes_run_two_stage_pipelines(tmp_path):
    """4 processes: a pipeline of 2 stages on each node, data parallel across."""
    nodes, runs = _run_nodes(
        tmp_path,
        2,
        2,
        "strategy=pipeline",
        "strategy.pipeline_size=2",
        *TINY,
        "experiment=pipe",
    )
    _assert_all_exited_zero(nodes)
    run_dir = _one_run(runs, "pipe")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["strategy"] == "pipeline"
    assert manifest["world_size"] == 4
    assert (manifest["num_nodes"], manifest["devices"]) == (2, 2)
    stages = manifest["pipeline"]["stages"]
    assert [(s["stage"], s["rank"]) for s in stages] == [(0, 0), (1, 1)]
    assert len(manifest["pipeline"]["split_points"]) == 1
    report = json.loads((run_dir / "report.json").read_text())
    assert report["world_size"] == 4 and report["num_samples"] == 360
    assert sum(n.stderr.count("pipeline: split") for n in nodes) == 1
    assert processes_mentioning(f"run.root={runs} ") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "expected NNODES NPROC_PER_NODE RDZV_HOST:PORT, got 0 argument(s)"),
        (["2", "1"], "got 2 argument(s)"),
        (["0", "1", "127.0.0.1:29500"], "NNODES must be a positive integer, got '0'"),
        (["2", "four", "h:29500"], "NPROC_PER_NODE must be a positive integer"),
        (["2", "1", "node01"], "RDZV_HOST:PORT must be a host and a port"),
        (["2", "1", "node01:70000"], "got 'node01:70000'"),
    ],
    ids=["no-args", "two-args", "zero-nodes", "word-nproc", "no-port", "port-70000"],
)
def test_torchrun_script_explains_its_usage(tmp_path, args, message):
    proc = subprocess.run(
        [str(SCRIPT), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "DLTRAIN": dltrain_exe()},
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "usage: torchrun.sh NNODES NPROC_PER_NODE RDZV_HOST:PORT" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_torchrun_script_names_a_missing_dltrain(tmp_path):
    proc = subprocess.run(
        [str(SCRIPT), "2", "1", "127.0.0.1:29500"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "DLTRAIN": str(tmp_path / "no-dltrain")},
    )
    assert proc.returncode == 2
    assert f"dltrain executable '{tmp_path / 'no-dltrain'}' not found" in proc.stderr


def test_slurm_script_requeues_on_sigusr1_and_the_requeued_job_continues(tmp_path):
    """scripts/slurm.sbatch with stand-ins for srun (one task, here) and scontrol
    (which records the requeue): no Slurm on this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "while [[ $1 == --* ]]; do shift; done\n"
        "export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1 SLURM_NODELIST=localhost\n"
        'exec "$@"\n'
    )
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\necho "$@" >> {tmp_path / "scontrol.log"}\n'
    )
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(dltrain_exe()).parent}:{os.environ['PATH']}",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NAME": "digits",
        "OMP_NUM_THREADS": "1",
    }
    args = [
        "bash",
        str(REPO / "scripts" / "slurm.sbatch"),
        "strategy=single",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=3",
        "data.batch_size=8",
        "checkpoint.every_n_steps=20",
        "report.plots=false",
    ]
    run = tmp_path / "runs" / "digits-77"
    job = subprocess.Popen(
        args, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.ckpt").exists():
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for pid in processes_mentioning("run.dir=runs/digits-77"):
        if "slurm.sbatch" not in Path(f"/proc/{pid}/cmdline").read_text():
            os.kill(pid, signal.SIGUSR1)  # what --signal=USR1@120 sends the tasks
    _, err = job.communicate(timeout=120)
    assert job.returncode == 138, err[-2000:]
    assert "requeueing job 77" in err
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"

    again = subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "run.resume=auto: continuing" in again.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and len(manifest["resumes"]) == 1
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]
