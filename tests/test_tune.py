"""`dltrain tune`: batch-size scaling and the learning-rate finder, through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PNG = b"\x89PNG\r\n\x1a\n"


def digits_train_size() -> int:
    """The training split of the default config (seed 42, 10% val, 20% test)."""
    from dltrain.data.readers import load_digits
    from dltrain.data.splits import split_indices

    images = load_digits()
    train, _, _ = split_indices(images.labels, 0.1, 0.2, 42, None, None, "digits")
    return len(train)


def tuner_leftovers(*folders: Path) -> list[Path]:
    return [
        path
        for folder in folders
        for pattern in (".scale_batch_size_*.ckpt", ".lr_find_*.ckpt")
        for path in folder.rglob(pattern)
    ]


def test_tune_digits_suggests_a_batch_size_and_a_learning_rate(dltrain):
    result = dltrain("tune", "--max-trials", "4", "--steps", "2", env=ONE_THREAD)
    assert result.code == 0, result

    run_dir = Path(result.err.splitlines()[-1].removeprefix("run directory: "))
    assert run_dir.parent == dltrain.cwd / "runs" and run_dir.name.startswith("tune_")
    tune = json.loads((run_dir / "tune.json").read_text())
    found, lr = tune["batch_size"], tune["lr"]

    # Power scaling from 2, four trials: on a CPU nothing runs out of memory.
    train_size = digits_train_size()
    assert found["train_size"] == train_size
    assert found["tried"] == [2, 4, 8, 16]
    assert found["suggested"] == 16 and found["method"] == "power"
    assert found["bound"] == "max_trials" and found["failed"] is None
    assert found["suggested"] & (found["suggested"] - 1) == 0
    assert found["suggested"] <= train_size

    # The learning rate was searched at the suggested batch size.
    assert lr["batch_size"] == 16 and lr["batch_size_from"] == "suggested"
    assert math.isfinite(lr["suggested"])
    assert lr["min_lr"] <= lr["suggested"] <= lr["max_lr"]
    assert len(lr["curve"]) == lr["steps_run"] > 10
    # The curve starts at an untrained model's loss, ln(10) for ten digits (not
    # at half of it, as Lightning's late bias correction draws it), and the
    # suggestion lies where the loss falls, not on the flat start.
    assert abs(lr["curve"][0]["loss"] - math.log(10)) < 0.1
    suggested_at = next(p for p in lr["curve"] if p["lr"] == lr["suggested"])
    assert suggested_at["loss"] < lr["curve"][10]["loss"] - 0.02
    assert lr["suggested"] > 1e-4

    out = result.out
    assert "batch size: 16 " in out
    assert "largest tried, bounded by --max-trials 4; no out-of-memory on cpu" in out
    assert "learning rate: " in out and "the suggested batch size" in out
    assert f"overrides: {tune['overrides']}\n" in out
    assert tune["overrides"].startswith("data.batch_size=16 optim.lr=")
    assert "sweep: dltrain sweep optim.lr=" in out
    assert tune["sweep"].endswith(" data.batch_size=16")

    png = (run_dir / "lr_find.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 1000
    assert (run_dir / "config.yaml").is_file()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["job"] == "tune" and manifest["status"] == "finished"
    assert not tuner_leftovers(dltrain.cwd, run_dir)


def test_tune_text_stops_at_the_training_split_and_prints_json(dltrain):
    text = dltrain.cwd / "corpus.txt"
    line = "the quick brown fox jumps over the lazy dog, said the tuner.\n"
    text.write_text(line * 200)
    folder = dltrain.cwd / "my-tune"
    result = dltrain(
        "tune",
        "--json",
        "--max-trials",
        "12",
        "--steps",
        "1",
        "--lr-steps",
        "20",
        "model=rnn",
        "data=text",
        f"data.path={text}",
        "data.train_samples=40",
        f"run.dir={folder}",
        env=ONE_THREAD,
    )
    assert result.code == 0, result
    tune = result.json()  # stdout holds the JSON only
    assert tune == json.loads((folder / "tune.json").read_text())
    found = tune["batch_size"]
    # 32 is the largest power of two within the 40 training samples per epoch.
    assert found["tried"] == [2, 4, 8, 16, 32]
    assert found["suggested"] == 32 and found["bound"] == "training split"
    assert math.isfinite(tune["lr"]["suggested"])
    assert "data.path=" in tune["sweep"] and "run.dir" not in tune["sweep"]
    assert (folder / "lr_find.png").read_bytes().startswith(PNG)
    assert not tuner_leftovers(dltrain.cwd)


@pytest.mark.parametrize(
    "args, names",
    [
        (["strategy=ddp", "trainer.devices=2"], ["strategy=ddp", "trainer.devices=2"]),
        (["--no-batch-size", "--no-lr"], ["--no-batch-size", "--no-lr"]),
    ],
    ids=["ddp", "nothing to do"],
)
def test_tune_refuses_with_one_line(dltrain, args, names):
    result = dltrain("tune", *args, env=ONE_THREAD)
    assert result.code == 2, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result
    assert all(name in lines[0] for name in names), result
    assert not (dltrain.cwd / "runs").exists()
