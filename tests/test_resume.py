"""`dltrain fit --resume`: a stopped run continues and ends with the weights of
an uninterrupted one (bitwise, on CPU with trainer.deterministic=true)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import assert_same_weights, run_dltrain, start_until

# Small batches: epochs long enough for an interrupt to land mid-run.
SAME = ["trainer.deterministic=true", "trainer.progress=plain", "data.batch_size=8"]


def _epochs_logged(run_dir: Path) -> list[int]:
    lines = (run_dir / "logs/metrics.csv").read_text().splitlines()[1:]
    return sorted({int(line.split(",")[0]) for line in lines})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("resume")
    result = run_dltrain("fit", "trainer.max_epochs=6", "run.dir=whole", *SAME, cwd=cwd)
    assert result.code == 0, result
    return cwd / "whole"


def test_training_on_from_a_finished_run(uninterrupted, tmp_path):
    first = run_dltrain(
        "fit", "trainer.max_epochs=3", "run.dir=part", *SAME, cwd=tmp_path
    )
    assert first.code == 0, first
    again = run_dltrain("fit", "--resume", "part", "trainer.max_epochs=6", cwd=tmp_path)
    assert again.code == 0, again
    assert "resuming from last.ckpt" in again.err
    assert "epoch 4/6" in again.err and "epoch 1/6" not in again.err
    assert_same_weights(uninterrupted, tmp_path / "part")
    assert _epochs_logged(tmp_path / "part") == list(range(6))
    manifest = json.loads((tmp_path / "part/manifest.json").read_text())
    assert manifest["status"] == "finished" and len(manifest["resumes"]) == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopped_mid_run_then_resumed(uninterrupted, tmp_path, sig):
    """Ctrl-C (SIGINT to the group), or SIGTERM as a scheduler sends it."""
    checkpoint = tmp_path / "stopped/checkpoints/last.ckpt"
    args = ["fit", "trainer.max_epochs=6", "run.dir=stopped", *SAME]
    proc = start_until(tmp_path, checkpoint, *args, timeout=120)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"interrupted by {sig.name}" in err and "Traceback" not in err
    manifest = json.loads((tmp_path / "stopped/manifest.json").read_text())
    if manifest["status"] == "finished":
        pytest.fail("the run ended before the interrupt; make it longer")
    assert manifest["status"] == "interrupted"
    again = run_dltrain("fit", "--resume", "stopped", cwd=tmp_path)
    assert again.code == 0, again
    assert_same_weights(uninterrupted, tmp_path / "stopped")
    assert _epochs_logged(tmp_path / "stopped") == list(range(6))


@pytest.mark.parametrize(
    "strategy",
    [
        ["strategy=ddp"],
        ["strategy=fsdp"],
        ["strategy=pipeline", "strategy.microbatches=4"],
    ],
    ids=["ddp", "fsdp", "pipeline"],
)
def test_distributed_resume_matches_uninterrupted(tmp_path, strategy):
    """FSDP resumes from one full checkpoint; the pipeline from the stages'
    gathered weights and each rank's own optimizer state."""
    ddp = [*strategy, "trainer.devices=2", *SAME, "trainer.limit_train_batches=20"]
    whole = run_dltrain(
        "fit", "trainer.max_epochs=3", "run.dir=whole", *ddp, cwd=tmp_path
    )
    assert whole.code == 0, whole
    part = run_dltrain(
        "fit", "trainer.max_epochs=1", "run.dir=part", *ddp, cwd=tmp_path
    )
    assert part.code == 0, part
    again = run_dltrain("fit", "--resume", "part", "trainer.max_epochs=3", cwd=tmp_path)
    assert again.code == 0, again
    assert_same_weights(tmp_path / "whole", tmp_path / "part")


def test_resume_bad_input(uninterrupted, tmp_path):
    run = str(uninterrupted)
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run/config.yaml").write_text(
        (uninterrupted / "config.yaml").read_text()
    )
    (tmp_path / "empty_run/manifest.json").write_text('{"status": "interrupted"}')
    cases = {
        "missing": (["--resume", "nope"], "--resume nope: no such run directory"),
        "other model": (
            ["--resume", run, "model=rnn"],
            "can change trainer.* values only",
        ),
        "finished": (["--resume", run], "finished its 6 epochs; to train on"),
        "no checkpoint": (["--resume", "empty_run"], "has no checkpoints/last.ckpt"),
        "with --config": (["--resume", run, "--config", "x.yaml"], "drop --config"),
    }
    before = sorted(p.name for p in uninterrupted.rglob("*"))
    for name, (args, message) in cases.items():
        result = run_dltrain("fit", *args, cwd=tmp_path, timeout=120)
        assert result.code == 2, f"{name}: {result}"
        assert message in result.err and "Traceback" not in result.err, (
            f"{name}: {result}"
        )
    assert sorted(p.name for p in uninterrupted.rglob("*")) == before
