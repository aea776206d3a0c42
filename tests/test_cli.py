"""The real `dltrain` entry point: help, version, config show, and bad input.

Every bad input must give one line naming the problem and the fix, exit code 2,
no traceback, and leave earlier files untouched.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import dltrain_exe

TINY = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
]


def _modules_loaded_by(*argv: str) -> str:
    """Run the CLI in a fresh interpreter; report whether torch or Lightning got imported."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('HEAVY' if {'torch', 'pytorch_lightning'} & "
        "set(sys.modules) else 'LIGHT', file=sys.stderr))\n"
        f"sys.argv = ['dltrain', *{list(argv)!r}]\n"
        "from dltrain.cli.app import main\nmain()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"], ["eval", "--help"]])
def test_help_does_not_import_torch_or_lightning(argv):
    output = _modules_loaded_by(*argv)
    assert "Usage: dltrain" in output
    assert output.rstrip().endswith("LIGHT")


def test_version(dltrain):
    from importlib.metadata import version

    result = dltrain("--version")
    assert result.code == 0 and result.out.strip() == f"dltrain {version('dltrain')}"


def test_config_show_composes_file_and_overrides(dltrain):
    exp = dltrain.cwd / "exp.yaml"
    exp.write_text("defaults:\n  - override /model: rnn\ntrainer:\n  max_epochs: 3\n")
    result = dltrain("config", "show", "--config", str(exp), "model.hidden_size=16")
    assert result.code == 0, result
    cfg = yaml.safe_load(result.out)
    assert cfg["model"] == {
        "name": "rnn",
        "cell": "lstm",
        "embed_dim": 32,
        "hidden_size": 16,
        "num_layers": 1,
        "dropout": 0.0,
    }
    assert cfg["trainer"]["max_epochs"] == 3 and cfg["data"]["name"] == "digits"


def _write_idx(
    path: Path, magic: bytes, dims: list[int], payload: bytes, gz: bool
) -> None:
    raw = magic + b"".join(d.to_bytes(4, "big") for d in dims) + payload
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, text the error must contain)."""
    empty = tmp / "empty_dir"
    empty.mkdir()
    wrong_magic = tmp / "wrong_magic"
    wrong_magic.mkdir()
    _write_idx(
        wrong_magic / "t10k-images-idx3-ubyte.gz",
        b"\x00\x00\x08\x01",
        [4, 28, 28],
        bytes(4 * 784),
        True,
    )
    _write_idx(
        wrong_magic / "t10k-labels-idx1-ubyte.gz",
        b"\x00\x00\x08\x01",
        [4],
        bytes(4),
        True,
    )
    truncated = tmp / "truncated"
    truncated.mkdir()
    _write_idx(
        truncated / "t10k-images-idx3-ubyte",
        b"\x00\x00\x08\x03",
        [4, 28, 28],
        bytes(3 * 784),
        False,
    )
    _write_idx(
        truncated / "t10k-labels-idx1-ubyte", b"\x00\x00\x08\x01", [4], bytes(4), False
    )
    (tmp / "empty.txt").write_text("")
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 500)
    not_a_run = tmp / "not_a_run"
    not_a_run.mkdir()
    (tmp / "one_char.txt").write_text("a" * 5000)
    negative = tmp / "negative_labels"
    negative.mkdir()
    _write_idx(
        negative / "t10k-images-idx3-ubyte",
        b"\x00\x00\x08\x03",
        [2, 28, 28],
        bytes(2 * 784),
        False,
    )
    _write_idx(
        negative / "t10k-labels-idx1-ubyte",
        b"\x00\x00\x09\x01",
        [2],
        b"\xff\x01",
        False,
    )
    bad_defaults = tmp / "bad_defaults.yaml"
    bad_defaults.write_text("defaults: 5\n")
    bad_group = tmp / "bad_group.yaml"
    bad_group.write_text("model: 5\n")
    broken_run = tmp / "broken_run"
    broken_run.mkdir()
    (broken_run / "config.yaml").write_text("model: [unclosed\n")
    rnn = ["model=rnn", "data=text"]
    pipe2 = ["strategy=pipeline", "trainer.devices=2"]
    return {
        "unknown group option": (
            ["fit", "model=resnet"],
            "model='resnet' is not a known model; choose one of: cnn, rnn",
        ),
        "unknown key": (
            ["fit", "trainer.epochs=3"],
            "unknown config key 'trainer.epochs'",
        ),
        "wrong type": (["fit", "trainer.max_epochs=ten"], "trainer.max_epochs"),
        "missing config file": (
            ["fit", "--config", str(tmp / "nope.yaml")],
            "nope.yaml: no such file",
        ),
        "mnist without root": (["fit", "data=mnist"], "data=mnist needs data.root"),
        "missing data folder": (
            ["fit", "data=mnist", f"data.root={tmp / 'absent'}"],
            "is not a folder",
        ),
        "folder without IDX": (
            ["fit", "data=mnist", f"data.root={empty}"],
            "t10k-images-idx3-ubyte",
        ),
        "IDX wrong magic": (
            ["fit", "data=mnist", f"data.root={wrong_magic}"],
            "not an IDX file of 3 dimension(s) (magic number 0x00000801; expected 0x00000803)",
        ),
        "IDX truncated": (["fit", "data=mnist", f"data.root={truncated}"], "truncated"),
        "missing text file": (
            ["fit", *rnn, f"data.path={tmp / 'absent.txt'}"],
            "no such file",
        ),
        "empty text file": (
            ["fit", *rnn, f"data.path={tmp / 'empty.txt'}"],
            "holds 0 characters",
        ),
        "undecodable text": (
            ["fit", *rnn, f"data.path={tmp / 'latin1.txt'}"],
            "not UTF-8 text (byte 0xe9 at offset 3)",
        ),
        "eval not a run": (["eval", str(not_a_run)], "is not a dltrain run"),
        "eval missing folder": (
            ["eval", str(tmp / "absent_run")],
            "no such run directory",
        ),
        "eval nothing": (["eval"], "give a run directory"),
        "too many devices": (
            ["fit", "strategy=ddp", f"trainer.devices={(os.cpu_count() or 1) + 1}"],
            "but this machine has",
        ),
        "gpu without gpu": (
            ["fit", "trainer.accelerator=gpu"],
            "no CUDA GPU is visible",
        ),
        "nodes without launcher": (
            ["fit", "strategy=ddp", "trainer.num_nodes=2"],
            "trainer.num_nodes=2 needs a launcher",
        ),
        "override without key": (["fit", "=5"], "error: "),
        "unresolvable interpolation": (
            ["fit", "trainer.max_epochs=${nope}"],
            "Interpolation key 'nope' not found",
        ),
        "nan learning rate": (
            ["fit", "optim.lr=nan"],
            "optim.lr=nan must be a finite number",
        ),
        "negative weight decay": (
            ["fit", "optim.weight_decay=-1"],
            "optim.weight_decay=-1.0 must be",
        ),
        "negative seed": (
            ["fit", "seed=-1"],
            "seed=-1 must be between 0 and 2**32 - 1",
        ),
        "experiment with a path": (
            ["fit", "experiment=../../escaped"],
            "use a plain name without slashes",
        ),
        "misspelled option": (["fit", "--jsn"], "unknown option '--jsn'"),
        "nested new key": (
            ["fit", "+trainer.foo=1"],
            "unknown config key 'trainer.foo'",
        ),
        "config is a folder": (
            ["fit", "--config", str(empty)],
            "is a folder; give an experiment YAML file",
        ),
        "defaults not a list": (
            ["fit", "--config", str(bad_defaults)],
            "defaults must be a list",
        ),
        "group value not a name": (
            ["fit", "--config", str(bad_group)],
            "model: 5 should name an option",
        ),
        "text path is a folder": (
            ["fit", *rnn, f"data.path={empty}"],
            "is a folder; give a UTF-8 text file",
        ),
        "one distinct character": (
            ["fit", *rnn, f"data.path={tmp / 'one_char.txt'}", "data.window=8"],
            "single distinct character",
        ),
        "negative labels": (
            ["fit", "data=mnist", f"data.root={negative}"],
            "labels must be digits 0..9, found -1",
        ),
        "splits too small": (
            ["fit", "data.val_fraction=0.001"],
            "cannot split 1797 samples of 10 classes",
        ),
        "eval broken config": (["eval", str(broken_run)], "is not a readable config"),
        "pipeline on one process": (
            ["fit", "strategy=pipeline"],
            "strategy=pipeline cuts the model into stages on different processes",
        ),
        "unknown schedule": (
            ["fit", *pipe2, "strategy.schedule=zerobubble"],
            "strategy.schedule='zerobubble' is not a known schedule",
        ),
        "1f1b with too few micro-batches": (
            ["fit", *pipe2, "strategy.microbatches=1"],
            "strategy.schedule=1f1b needs at least as many micro-batches as stages",
        ),
        "micro-batches not dividing the batch": (
            ["fit", *pipe2, "strategy.microbatches=5"],
            "strategy.microbatches=5 must divide data.batch_size=64",
        ),
        "split point out of range": (
            ["fit", *pipe2, "strategy.split_points=[11]"],
            "strategy.split_points=[11] must list 1 increasing layer indices between 1 and 10",
        ),
        "more stages than layers": (
            [
                "fit",
                *pipe2,
                "model=rnn",
                "data=text",
                "strategy.schedule=interleaved_1f1b",
                "strategy.stages_per_rank=3",
                "strategy.microbatches=4",
            ],
            "the pipeline has 6 stages",
        ),
        "pipeline size not dividing the world": (
            ["fit", *pipe2, "strategy.pipeline_size=3"],
            "strategy.pipeline_size=3 must be at least 2 and divide the world size 2",
        ),
        "interleaved without virtual stages": (
            ["fit", *pipe2, "strategy.schedule=interleaved_1f1b"],
            "strategy.stages_per_rank=1 does not fit strategy.schedule=interleaved_1f1b",
        ),
        "fsdp unknown precision": (
            ["fit", "strategy=fsdp", "strategy.mixed_precision=fp8"],
            "strategy.mixed_precision='fp8' is not supported",
        ),
        "fsdp offload on cpu": (
            [
                "fit",
                "strategy=fsdp",
                "trainer.accelerator=cpu",
                "strategy.cpu_offload=true",
            ],
            "strategy.cpu_offload=true moves sharded parameters",
        ),
        "pipeline in bf16-true": (
            ["fit", *pipe2, "trainer.precision=bf16-true"],
            "trainer.precision=bf16-true is not supported with strategy=pipeline",
        ),
        "fsdp in 64-true": (
            ["fit", "strategy=fsdp", "trainer.precision=64-true"],
            "trainer.precision=64-true is not supported with strategy=fsdp",
        ),
        "pipeline size zero": (
            ["fit", *pipe2, "strategy.pipeline_size=0"],
            "strategy.pipeline_size=0 must be at least 2",
        ),
        "plan of a bad pipeline": (
            ["plan", *pipe2, "strategy.split_points=[0]"],
            "strategy.split_points=[0] must list",
        ),
        "run.dir not empty": (
            ["fit", f"run.dir={not_a_run.parent}"],
            "is a folder with other files in it",
        ),
    }


def test_every_bad_input_exits_2_with_a_message(dltrain):
    cases = _bad_inputs(dltrain.cwd)
    for name, (args, expected) in cases.items():
        result = dltrain(*args, timeout=120)
        assert result.code == 2, f"{name}: {result}"
        assert expected in result.err, f"{name}: {result}"
        assert result.err.startswith("error: "), f"{name}: {result}"
        assert "Traceback" not in result.err, f"{name}: {result}"
        assert result.out == "", f"{name}: stdout must stay empty: {result}"
    assert not (dltrain.cwd / "runs").exists(), "a refused run must not leave a folder"


def test_new_top_level_keys_are_kept_as_notes(dltrain):
    result = dltrain("config", "show", "+note=baseline", "+tags=[a,b]")
    assert result.code == 0, result
    cfg = yaml.safe_load(result.out)
    assert cfg["note"] == "baseline" and cfg["tags"] == ["a", "b"]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_checkpoint_of_another_model_and_reused_run_dir(dltrain):
    cnn = dltrain("fit", "run.dir=cnn_run", *TINY)
    assert cnn.code == 0, cnn
    rnn = dltrain("fit", "run.dir=rnn_run", "model=rnn", *TINY)
    assert rnn.code == 0, rnn
    before = _digest(dltrain.cwd / "cnn_run")

    other = dltrain("eval", "cnn_run", "--ckpt", "rnn_run/checkpoints/last.ckpt")
    assert other.code == 2, other
    assert "holds a model=rnn" in other.err and "asks for model=cnn" in other.err
    assert "eval:" not in other.err  # refused before anything started

    again = dltrain("fit", "run.dir=cnn_run", *TINY)
    assert again.code == 2, again
    assert "run.dir=" in again.err and "already holds a run" in again.err

    garbage = dltrain.cwd / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    broken = dltrain("eval", "cnn_run", "--ckpt", str(garbage))
    assert broken.code == 2 and "not a loadable checkpoint" in broken.err, broken
    assert "weights_only" not in broken.err  # torch's unsafe advice is not passed on
    truncated = dltrain.cwd / "truncated.ckpt"
    truncated.write_bytes(
        (dltrain.cwd / "cnn_run/checkpoints/last.ckpt").read_bytes()[:5000]
    )
    cut = dltrain("eval", "cnn_run", "--ckpt", str(truncated))
    assert cut.code == 2 and "truncated, corrupt" in cut.err, cut

    changed = dltrain("eval", "cnn_run", "model.hidden=64")
    assert changed.code == 2 and "asks for model=cnn" in changed.err, changed

    assert _digest(dltrain.cwd / "cnn_run") == before  # no eval folder was even made


def test_debug_shows_the_traceback(dltrain):
    result = dltrain("--debug", "fit", "model=resnet")
    assert result.code != 0 and "Traceback" in result.err


def test_entry_point_is_installed():
    assert Path(dltrain_exe()).exists()


def test_launcher_layout_mismatches_are_refused(dltrain):
    """torchrun/srun set the world; a config or an uneven srun that disagrees
    would leave ranks waiting for peers that never come."""
    torchrun = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
    }
    result = dltrain("fit", "strategy=ddp", "trainer.devices=4", env=torchrun)
    assert result.code == 2, result
    assert "trainer.devices=4 but the launcher started 2 processes" in result.err
    uneven = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "3",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "2,1",
    }
    result = dltrain("fit", "strategy=ddp", env=uneven)
    assert result.code == 2, result
    assert "srun started 3 tasks on 2 nodes" in result.err
    for env, message in (
        ({**torchrun, "RANK": "5"}, "RANK=5, WORLD_SIZE=2"),
        ({**torchrun, "WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' must be an integer"),
        ({**torchrun, "LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE='0' must be"),
        (
            {
                **uneven,
                "SLURM_PROCID": "7",
                "SLURM_NTASKS": "2",
                "SLURM_NNODES": "1",
                "SLURM_NTASKS_PER_NODE": "2",
            },
            "SLURM_PROCID=7 but SLURM_NTASKS=2",
        ),
        ({"SLURM_NTASKS": "4", "SLURM_NNODES": "2"}, "no SLURM_PROCID"),
        (
            {**uneven, "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "4"},
            "srun started 4 tasks on 2 nodes",
        ),
    ):
        result = dltrain("fit", "strategy=fsdp", env=env, timeout=60)
        assert result.code == 2 and message in result.err, result
    four = {**torchrun, "WORLD_SIZE": "4"}
    result = dltrain("fit", "strategy=pipeline", "strategy.pipeline_size=3", env=four)
    assert result.code == 2, result
    assert "divide the world size 4" in result.err
    assert not (dltrain.cwd / "runs").exists()


def test_plan_shows_the_split_and_the_launch_lines(dltrain):
    result = dltrain(
        "plan",
        "strategy=pipeline",
        "trainer.devices=2",
        "trainer.num_nodes=2",
        "strategy.pipeline_size=2",
        "strategy.balance=flops",
        "--json",
    )
    assert result.code == 0, result
    plan = result.json()
    assert plan["world_size"] == 4 and plan["mesh"] == {"dp": 2, "pp": 2}
    assert plan["global_batch"] == 128
    stages = plan["pipeline"]["stages"]
    assert len(stages) == 2 and [s["rank"] for s in stages] == [0, 1]
    assert plan["pipeline"]["bubble_fraction"] == round(1 / 5, 4)
    # Balanced by counted FLOPs: no other cut makes the costlier stage cheaper.
    assert plan["pipeline"]["split_points"] == [4]
    commands = plan["commands"]
    assert commands["torchrun"].startswith("torchrun --nnodes=2 --nproc-per-node=2 ")
    assert "trainer.num_nodes=2" in commands["srun"]
    assert commands["sbatch"].startswith("sbatch --nodes=2 --ntasks-per-node=2")
    assert not (dltrain.cwd / "runs").exists(), "plan must not start a run"
    text = dltrain("plan", "strategy=fsdp", "trainer.devices=2")
    assert text.code == 0, text
    assert "parameter bytes per rank" in text.out and "dp_shard 2" in text.out
