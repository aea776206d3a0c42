"""FSDP and pipeline strategies: the same training as one process, and their plans.

The distributed runs are real: two worker processes, gloo process groups on
127.0.0.1, FSDP2 and torch.distributed.pipelining.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from conftest import run_dltrain
from dltrain.trainers.pipeline import (
    balance,
    bubble_fraction,
    describe_plan,
    layer_costs,
)
from dltrain.trainers.schema import PIPELINE_LAYERS

# A few optimizer steps, no dropout: every strategy must compute the same thing.
STEPS = [
    "model.dropout=0",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "report.plots=false",
]
CNN = ["data.batch_size=64"]
CNN_HALF = ["data.batch_size=32"]  # per process: two processes see 64 a step
RNN = [
    "model=rnn",
    "data=text",
    "data.train_samples=2048",
    "data.window=16",
    "data.batch_size=64",
]
RNN_HALF = [*RNN[:-1], "data.batch_size=32"]
PIPE = ["strategy=pipeline", "trainer.devices=2"]
SHARDED = ["strategy=fsdp", "trainer.devices=2"]
DDP = ["strategy=ddp", "trainer.devices=2"]

RUNS = {
    "cnn-single": CNN,
    "cnn-ddp": [*CNN_HALF, *DDP],
    "cnn-fsdp": [*CNN_HALF, *SHARDED],
    "cnn-fsdp-layers-checkpointed": [
        *CNN_HALF,
        *SHARDED,
        "strategy.wrap=layers",
        "strategy.activation_checkpointing=true",
        "strategy.reshard_after_forward=false",
    ],
    "cnn-pipeline-1f1b": [*CNN, *PIPE, "strategy.schedule=1f1b"],
    "cnn-pipeline-gpipe": [*CNN, *PIPE, "strategy.schedule=gpipe"],
    "cnn-pipeline-interleaved": [
        *CNN,
        *PIPE,
        "strategy.schedule=interleaved_1f1b",
        "strategy.stages_per_rank=2",
    ],
    "rnn-single": RNN,
    "rnn-fsdp": [*RNN_HALF, *SHARDED],
    "rnn-pipeline": [*RNN, *PIPE, "strategy.microbatches=8"],
}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict[str, Path]:
    """Every run of RUNS, fitted once for the tests of this module."""
    root = tmp_path_factory.mktemp("strategies")
    folders = {}
    for name, overrides in RUNS.items():
        folder = root / name
        result = run_dltrain(
            "fit", *STEPS, *overrides, f"run.dir={folder}", cwd=root, timeout=300
        )
        assert result.code == 0, f"{name}: {result}"
        folders[name] = folder
    return folders


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["state_dict"]


def _epoch_losses(run: Path) -> list[float]:
    with (run / "logs" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return [float(r["train_loss"]) for r in rows if r.get("train_loss")]


@pytest.mark.parametrize(
    "name", [n for n in RUNS if not n.endswith("-single")], ids=lambda n: n
)
def test_strategy_trains_like_one_process(fitted, name):
    reference = fitted[name.split("-")[0] + "-single"]
    expected, got = _weights(reference), _weights(fitted[name])
    assert got.keys() == expected.keys(), "the checkpoint must hold the whole model"
    for key in expected:
        torch.testing.assert_close(
            got[key], expected[key], rtol=1e-4, atol=2e-5, msg=f"{name}: {key}"
        )
    losses, reference_losses = _epoch_losses(fitted[name]), _epoch_losses(reference)
    assert len(losses) == len(reference_losses) == 2
    assert losses == pytest.approx(reference_losses, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["cnn-fsdp", "cnn-pipeline-1f1b", "rnn-pipeline"])
def test_one_device_evaluates_a_distributed_checkpoint(fitted, name):
    run = fitted[name]
    saved = json.loads((run / "report.json").read_text())
    result = run_dltrain(
        "eval",
        str(run),
        "strategy=single",
        "trainer.devices=1",
        "--json",
        cwd=run.parent,
        timeout=300,
    )
    assert result.code == 0, result
    report = result.json()
    assert report["world_size"] == 1 and saved["world_size"] == 2
    assert report["num_samples"] == saved["num_samples"]
    for metric, value in saved["metrics"].items():
        assert report["metrics"][metric] == pytest.approx(value, rel=1e-5), metric
    assert report.get("confusion_matrix") == saved.get("confusion_matrix")


def test_pipeline_split_is_recorded_in_the_manifest(fitted):
    manifest = json.loads(
        (fitted["cnn-pipeline-interleaved"] / "manifest.json").read_text()
    )
    plan = manifest["pipeline"]
    assert len(plan["stages"]) == 4
    assert [s["rank"] for s in plan["stages"]] == [0, 1, 0, 1]
    layers = [layer for stage in plan["stages"] for layer in stage["layers"]]
    assert len(layers) == PIPELINE_LAYERS["cnn"] and layers[0] == "features.0.0"
    assert all(s["cost"] > 0 for s in plan["stages"])
    assert plan["cost_unit"] == "ms"


def _brute_force(costs: list[float], stages: int) -> float:
    best = float("inf")
    for points in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = [0, *points, len(costs)]
        best = min(
            best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
        )
    return best


def test_balance_minimizes_the_slowest_stage():
    assert balance([1, 1, 1, 1], 2) == [2]
    assert balance([5, 1, 1, 1, 1, 1], 2) == [1]
    assert balance([1, 1, 1, 10], 2) == [3]
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 9)
        stages = rng.randint(1, n)
        costs = [rng.random() for _ in range(n)]
        points = balance(costs, stages)
        bounds = [0, *points, n]
        assert len(points) == stages - 1 and points == sorted(set(points))
        slowest = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
        assert slowest == pytest.approx(_brute_force(costs, stages))
    with pytest.raises(ValueError):
        balance([1, 2], 3)


def test_layer_flops_are_counted_per_layer():
    from dltrain.models.cnn import CNN as Net

    net = Net((1, 8, 8), 10)
    layers = net.layers()
    assert len(layers) == PIPELINE_LAYERS["cnn"]
    flops = layer_costs(layers, torch.randn(16, 1, 8, 8), kind="flops")
    # conv 1->32 on 8x8 (3x3 kernel), forward 2*MACs, backward twice that for
    # the weight and input gradients, but the first layer's input needs none.
    assert flops[0] == pytest.approx(2 * 16 * 32 * 64 * 9 * (1 + 1))
    assert flops[1] == 0 and flops[2] == 0  # ReLU and pooling: no matmul FLOPs
    assert max(flops) == flops[3]  # the second convolution is the costliest
    plan = describe_plan([n for n, _ in layers], flops, balance(flops, 2), "flops")
    assert sum(s["cost"] for s in plan["stages"]) == pytest.approx(sum(flops))
    assert 0 < plan["balance"] <= 1


def test_rnn_layers_match_the_model_count():
    from dltrain.models.rnn import BiRNN

    assert len(BiRNN(10, vocab_size=20).layers()) == PIPELINE_LAYERS["rnn"]


def test_bubble_fraction():
    assert bubble_fraction("gpipe", 2, 4) == pytest.approx(1 / 5)
    assert bubble_fraction("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("interleaved_1f1b", 2, 4, v=2) == pytest.approx(1 / 9)
