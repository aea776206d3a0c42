"""Jobs that die: signals mid-epoch, requeue with run.resume=auto, torchrun,
elastic restarts after a killed worker, full disks, crafted checkpoints, seeds.

Every run is a real `dltrain` process (and real workers); "the same weights"
means bitwise equal on CPU with trainer.deterministic=true.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    assert_same_weights,
    dltrain_exe,
    last_weights,
    processes_mentioning,
    run_dltrain,
)

# Short epochs of small batches, a step checkpoint every 25 steps.
SAME = [
    "trainer.deterministic=true",
    "trainer.progress=plain",
    "data.batch_size=8",
    "trainer.max_epochs=3",
    "trainer.limit_val_batches=3",
    "checkpoint.every_n_steps=25",
    "report.plots=false",
]
DDP = ["strategy=ddp", "trainer.devices=2"]


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _step(run: Path) -> int:
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    return ckpt["global_step"]


def _start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the same threads as the runs it is compared with
    )


def _wait_for_new(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Return once ``path`` is (re)written after now, while ``proc`` still runs."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_mtime_ns > before):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.02)


def _no_process_left(marker: str) -> None:
    deadline = time.monotonic() + 30
    while alive := processes_mentioning(marker):
        assert time.monotonic() < deadline, f"processes left running: {alive}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs: one process, and DDP on two."""
    cwd = tmp_path_factory.mktemp("whole")
    runs = {}
    for name, extra in (("single", []), ("ddp", DDP)):
        result = run_dltrain("fit", *SAME, *extra, f"run.dir={name}", cwd=cwd)
        assert result.code == 0, result
        runs[name] = cwd / name
    return runs


@pytest.mark.parametrize("name", ["single", "ddp"])
def test_sigterm_mid_epoch_saves_the_step_and_resume_is_exact(whole, tmp_path, name):
    extra = DDP if name == "ddp" else []
    last = tmp_path / "cut/checkpoints/last.ckpt"
    proc = _start(tmp_path, dltrain_exe(), "fit", *SAME, *extra, "run.dir=cut")
    _wait_for_new(last, proc)  # the first step checkpoint, inside epoch 1
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.count("interrupted by SIGTERM; the run directory records it") == 1
    assert "Traceback" not in err
    step = _step(tmp_path / "cut")
    steps_per_epoch = 158 if name == "single" else 79
    assert 25 <= step < steps_per_epoch, "the stop must land inside the first epoch"
    assert _manifest(tmp_path / "cut")["status"] == "interrupted"
    _no_process_left(str(tmp_path / "cut"))

    again = run_dltrain("fit", "--resume", "cut", cwd=tmp_path)
    assert again.code == 0, again
    assert "resuming from last.ckpt" in again.err
    assert_same_weights(whole[name], tmp_path / "cut")


def test_a_stop_at_an_epochs_last_step_keeps_its_validation(tmp_path):
    """One training step per epoch: every step is an epoch's last, so the stop
    lands there; the epoch's validation must still run before the checkpoint
    (a resume never validates an epoch again, and could not pick it as best)."""
    one_step = [
        "trainer.deterministic=true",
        "trainer.progress=plain",
        "data.batch_size=2048",  # the 1,257 training images in one batch
        "trainer.max_epochs=12",
        "report.plots=false",
    ]
    whole = run_dltrain("fit", *one_step, "run.dir=whole", cwd=tmp_path)
    assert whole.code == 0, whole
    proc = _start(tmp_path, dltrain_exe(), "fit", *one_step, "run.dir=cut")
    _wait_for_new(tmp_path / "cut/checkpoints/last.ckpt", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    stopped_after = _step(tmp_path / "cut")
    assert 1 <= stopped_after < 12

    def validated_epochs(run: Path) -> list[int]:
        rows = (run / "logs/metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        epoch, val = header.index("epoch"), header.index("val_acc")
        return [int(r.split(",")[epoch]) for r in rows[1:] if r.split(",")[val]]

    assert validated_epochs(tmp_path / "cut") == list(range(stopped_after))
    again = run_dltrain("fit", "--resume", "cut", cwd=tmp_path)
    assert again.code == 0, again
    assert validated_epochs(tmp_path / "cut") == list(range(12))
    assert_same_weights(tmp_path / "whole", tmp_path / "cut")
    best = json.loads((tmp_path / "cut/report.json").read_text())["checkpoint"]
    assert best == json.loads((tmp_path / "whole/report.json").read_text())[
        "checkpoint"
    ].replace("/whole/", "/cut/")


def test_sigusr1_requeue_loop_with_resume_auto(whole, tmp_path):
    """What scripts/slurm.sbatch does: the same command, again and again."""
    command = [dltrain_exe(), "fit", *SAME, "run.dir=job", "run.resume=auto"]
    last = tmp_path / "job/checkpoints/last.ckpt"
    steps = []
    for attempt in range(2):
        proc = _start(tmp_path, *command)
        _wait_for_new(last, proc)
        os.killpg(proc.pid, signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 138, err[-2000:]  # 128 + SIGUSR1: requeue me
        assert ("continuing" in err) == (attempt == 1), err[-2000:]
        steps.append(_step(tmp_path / "job"))
    assert steps[1] > steps[0]
    done = run_dltrain(*command[1:], cwd=tmp_path)
    assert done.code == 0, done
    assert "run.resume=auto: continuing" in done.err
    assert_same_weights(whole["single"], tmp_path / "job")
    manifest = _manifest(tmp_path / "job")
    assert manifest["status"] == "finished" and len(manifest["resumes"]) == 2
    again = run_dltrain(*command[1:], cwd=tmp_path)
    assert again.code == 0 and "finished its 3 epochs already" in again.err, again
    assert _manifest(tmp_path / "job") == manifest  # nothing was run or rewritten

    other = run_dltrain(*command[1:], "model.hidden=32", cwd=tmp_path)
    assert other.code == 2 and "holds a run with another model" in other.err, other


def test_torchrun_sigterm_then_resume_auto(whole, tmp_path):
    """Under torchrun the agent forwards SIGTERM; every rank stops at one step."""
    torchrun = str(Path(dltrain_exe()).with_name("torchrun"))
    command = [
        torchrun,
        "--nnodes=1",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        dltrain_exe(),
        "fit",
        *SAME,
        "strategy=ddp",
        "run.dir=job",
        "run.resume=auto",
    ]
    proc = _start(tmp_path, *command)
    _wait_for_new(tmp_path / "job/checkpoints/last.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert err.count("interrupted by SIGTERM; the run directory records it") == 1
    assert _manifest(tmp_path / "job")["status"] == "interrupted"
    _no_process_left(str(tmp_path / "job"))
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run.resume=auto: continuing" in done.stderr
    assert_same_weights(whole["ddp"], tmp_path / "job")


def _worker_pids(run_dir: Path) -> dict[int, int]:
    """Global rank -> pid of the workers of one run (from /proc)."""
    found = {}
    for pid in processes_mentioning(str(run_dir)):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
        if ranks and b"dltrain.trainers.worker" in cmd:
            found[ranks[0]] = int(pid)
    return found


def test_a_killed_worker_is_restarted_and_the_run_finishes(whole, tmp_path):
    run = tmp_path / "elastic"
    args = [*SAME, *DDP, "run.max_restarts=1", f"run.dir={run}"]
    proc = _start(tmp_path, dltrain_exe(), "fit", *args)
    _wait_for_new(run / "checkpoints/last.ckpt", proc)
    os.kill(_worker_pids(run)[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    restarts = _manifest(run)["restarts"]
    assert len(restarts) == 1 and restarts[0]["attempt"] == 1
    assert restarts[0]["resumed_from"] == "checkpoints/last.ckpt"
    assert "local rank 1 died without recording an error" in restarts[0]["causes"][0]
    assert _manifest(run)["status"] == "finished"
    assert_same_weights(whole["ddp"], run)  # the restart resumed exactly

    # Without restarts the same failure ends the run, and says so.
    failing = tmp_path / "no_restart"
    proc = _start(tmp_path, dltrain_exe(), "fit", *SAME, *DDP, f"run.dir={failing}")
    _wait_for_new(failing / "checkpoints/last.ckpt", proc)
    os.kill(_worker_pids(failing)[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "was killed by signal 9" in err, err[-2000:]
    assert _manifest(failing)["status"] == "failed"
    _no_process_left(str(failing))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    first = run_dltrain(
        "fit", *SAME, "trainer.max_epochs=1", "run.dir=run", cwd=tmp_path
    )
    assert first.code == 0, first
    before = _digest(tmp_path / "run/checkpoints/last.ckpt")

    def small_files() -> None:  # writes past 200 kB fail as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = subprocess.run(
        [dltrain_exe(), "fit", "--resume", "run", "trainer.max_epochs=2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot write the checkpoint" in result.stderr
    assert "is the disk full?" in result.stderr and "is intact" in result.stderr
    assert _digest(tmp_path / "run/checkpoints/last.ckpt") == before
    assert not list((tmp_path / "run/checkpoints").glob(".*tmp*"))
    assert _manifest(tmp_path / "run")["status"] == "failed"
    ok = run_dltrain("fit", "--resume", "run", "trainer.max_epochs=2", cwd=tmp_path)
    assert ok.code == 0, ok  # with room again, the run continues from the kept file


class _Payload:
    """Unpickling this would create a file: a checkpoint must never run it."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_checkpoints_are_loaded_without_running_their_code(tmp_path):
    ok = run_dltrain("fit", *SAME, "trainer.max_epochs=1", "run.dir=run", cwd=tmp_path)
    assert ok.code == 0, ok
    run = tmp_path / "run"
    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    pwned = tmp_path / "pwned"
    checkpoint["payload"] = _Payload(pwned)
    crafted = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, crafted)
    intact = {p.name: _digest(p) for p in (run / "checkpoints").iterdir()}

    evaluated = run_dltrain("eval", "--ckpt", str(crafted), cwd=tmp_path)
    assert evaluated.code == 2 and "refused" in evaluated.err, evaluated
    (run / "checkpoints/last.ckpt").write_bytes(crafted.read_bytes())
    resumed = run_dltrain(
        "fit", "--resume", "run", "trainer.max_epochs=2", cwd=tmp_path
    )
    assert resumed.code == 2 and "refused" in resumed.err, resumed
    assert not pwned.exists(), "loading a checkpoint ran code from it"

    (run / "checkpoints/last.ckpt").write_bytes(b"")
    empty = run_dltrain("fit", "--resume", "run", "trainer.max_epochs=2", cwd=tmp_path)
    assert empty.code == 2 and "not a loadable checkpoint" in empty.err, empty
    assert _digest(run / "checkpoints/best.ckpt") == intact["best.ckpt"]


def test_one_seed_one_run_and_different_streams_per_rank(tmp_path):
    from dltrain.trainers.run import rank_seed

    def draws(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.rand(8)

    assert torch.equal(draws(rank_seed(42, 0)), draws(rank_seed(42, 0)))
    assert not torch.equal(draws(rank_seed(42, 0)), draws(rank_seed(42, 1)))
    assert rank_seed(42, 1) != rank_seed(43, 0)

    tiny = ["trainer.max_epochs=2", "trainer.deterministic=true", "report.plots=false"]
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        result = run_dltrain(
            "fit", *tiny, f"seed={seed}", f"run.dir={name}", cwd=tmp_path
        )
        assert result.code == 0, result
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    wa, wc = last_weights(tmp_path / "a"), last_weights(tmp_path / "c")
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    # Epochs differ: each draws its own order of the training set, the same
    # order for the same seed and epoch.
    from dltrain.data.datamodules import ImageDataModule
    from dltrain.data.readers import load_digits

    def order(seed: int, epoch: int) -> list[int]:
        data = ImageDataModule(load_digits(), 64, 0.1, 0.2, seed)
        sampler = data.train_dataloader().sampler
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)


def test_checkpoint_interval_and_snapshots_kept(tmp_path):
    result = run_dltrain(
        "fit",
        "trainer.max_epochs=4",
        "checkpoint.keep=2",
        "checkpoint.every_n_steps=7",
        "report.plots=false",
        "run.dir=run",
        cwd=tmp_path,
    )
    assert result.code == 0, result
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    # epoch indexes from 0: the two most recent of 0..3 are kept
    assert names == ["best.ckpt", "epoch-0002.ckpt", "epoch-0003.ckpt", "last.ckpt"]
    snapshot = torch.load(
        tmp_path / "run/checkpoints/epoch-0002.ckpt", weights_only=True
    )
    assert snapshot["epoch"] == 2
    bad = run_dltrain("fit", "checkpoint.keep=-1", cwd=tmp_path)
    assert bad.code == 2 and "checkpoint.keep=-1 must be >= 0" in bad.err, bad


def test_last_checkpoint_holds_the_last_epoch_not_the_best(whole):
    # 3 epochs of 158 steps (one process) and of 79 (two): last.ckpt is the end.
    assert _step(whole["single"]) == 3 * 158
    assert _step(whole["ddp"]) == 3 * 79


def test_sigusr1_to_the_launcher_alone_stops_its_workers(whole, tmp_path):
    """A scheduler may signal only the process it started: dltrain passes
    SIGUSR1 on to its workers, which stop together."""
    proc = _start(tmp_path, dltrain_exe(), "fit", *SAME, *DDP, "run.dir=cut")
    _wait_for_new(tmp_path / "cut/checkpoints/last.ckpt", proc)
    os.kill(proc.pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 138, err[-2000:]
    assert _manifest(tmp_path / "cut")["status"] == "interrupted"
    _no_process_left(str(tmp_path / "cut"))
    again = run_dltrain("fit", "--resume", "cut", cwd=tmp_path)
    assert again.code == 0, again
    assert_same_weights(whole["ddp"], tmp_path / "cut")


def test_one_run_dir_one_process_and_a_broken_manifest(tmp_path):
    args = [*SAME, "trainer.max_epochs=10", "run.dir=job", "run.resume=auto"]
    first = _start(tmp_path, dltrain_exe(), "fit", *args)
    _wait_for_new(tmp_path / "job/checkpoints/last.ckpt", first)
    second = run_dltrain("fit", *args, cwd=tmp_path)
    assert second.code == 2 and "is in use by another dltrain process" in second.err
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    manifest = tmp_path / "job/manifest.json"
    manifest.write_text('{"status": ')
    broken = run_dltrain(
        "fit", "--resume", "job", "trainer.max_epochs=11", cwd=tmp_path
    )
    assert broken.code == 2 and "manifest.json is not valid JSON" in broken.err, broken
    manifest.unlink()
    missing = run_dltrain(
        "fit", "--resume", "job", "trainer.max_epochs=3", cwd=tmp_path
    )
    assert missing.code == 2 and "manifest.json is missing" in missing.err, missing
