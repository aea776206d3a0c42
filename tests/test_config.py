"""Config composition and validation, without training anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dltrain.cli.compose import apply_overrides, compose, experiment_overrides
from dltrain.trainers.errors import ConfigError
from dltrain.trainers.schema import validate


def test_default_is_cnn_on_digits_single_device():
    cfg, overrides = compose(None, [])
    assert (cfg.model.name, cfg.data.name, cfg.strategy.name) == (
        "cnn",
        "digits",
        "single",
    )
    assert list(cfg.model.channels) == [32, 64] and cfg.model.hidden == 128
    assert cfg.trainer.max_epochs == 30  # digits brings its own epochs
    assert cfg.seed == 42 and overrides == []


def test_each_data_set_brings_its_epochs_and_the_shell_wins():
    text, _ = compose(None, ["model=rnn", "data=text"])
    assert text.trainer.max_epochs == 5 and text.optim.lr == 0.003
    assert text.model.hidden_size == 64 and text.model.cell.value == "lstm"
    shell, _ = compose(
        None, ["model=rnn", "data=text", "trainer.max_epochs=2", "optim.lr=0.01"]
    )
    assert shell.trainer.max_epochs == 2 and shell.optim.lr == 0.01


def test_experiment_file_picks_groups_and_values(tmp_path: Path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "defaults:\n  - override /model: rnn\n  - data: text\n"
        "trainer:\n  max_epochs: 3\nmodel:\n  cell: gru\n  hidden_size: 32\n"
        'data:\n  path: "it\'s here.txt"\n'
    )
    cfg, overrides = compose(exp, ["trainer.max_epochs=4"])
    assert cfg.model.name == "rnn" and cfg.data.name == "text"
    assert cfg.model.cell.value == "gru" and cfg.model.hidden_size == 32
    assert cfg.data.path == "it's here.txt"
    assert cfg.trainer.max_epochs == 4  # the shell comes after the file
    assert overrides[:2] == ["model=rnn", "data=text"]


def test_experiment_file_top_level_group_choice(tmp_path: Path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("model: rnn\nstrategy: ddp\nseed: 7\nmodel_unused: null\n")
    with pytest.raises(
        ConfigError, match="unknown config key 'model_unused'.*--config"
    ):
        compose(exp, [])
    exp.write_text("model: rnn\nstrategy: ddp\nseed: 7\n")
    cfg, _ = compose(exp, [])
    assert (cfg.model.name, cfg.strategy.name, cfg.seed) == ("rnn", "ddp", 7)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model=transformer"],
            "model='transformer' is not a known model; choose one of: cnn, rnn",
        ),
        (["data=imagenet"], "choose one of: digits, mnist, text"),
        (["strategy=fsdp2"], "choose one of: single, ddp"),
        (["trainer.epochs=3"], "unknown config key 'trainer.epochs'"),
        (["trainer.max_epochs=three"], "trainer.max_epochs"),
        (["trainer.max_epochs=0"], "trainer.max_epochs=0 must be positive"),
        (["trainer.precision=8-bit"], "trainer.precision='8-bit' is not supported"),
        (["trainer.accelerator=tpu"], "trainer.accelerator"),
        (["model.cell=transformer"], "model.cell"),
        (["model=rnn", "model.cell=transformer"], "model.cell"),
        (["data=text"], "model=cnn reads images and cannot model data=text"),
        (["trainer.devices=2"], "strategy=single runs one process"),
        (["data.test_fraction=1.5"], "data.test_fraction=1.5 must be between 0 and 1"),
        (["model.channels=[8]"], "model.channels"),
        (["strategy=ddp", "strategy.backend=mpi"], "strategy.backend='mpi'"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(None, overrides)
    assert message in str(err.value)


def test_missing_or_broken_experiment_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="--config .*nope.yaml: no such file"):
        experiment_overrides(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        experiment_overrides(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        experiment_overrides(bad)


def test_validate_rejects_a_hand_edited_config():
    cfg, _ = compose(None, [])
    raw = OmegaConf.create(OmegaConf.to_container(cfg, enum_to_str=True))
    raw.trainer.devices = "many"
    with pytest.raises(ConfigError, match="trainer.devices"):
        validate(raw)


def test_eval_overrides_change_strategy_and_trainer_only():
    cfg, _ = compose(None, [])
    moved = apply_overrides(
        cfg, ["strategy=ddp", "trainer.devices=2", "data.batch_size=7"]
    )
    assert moved.strategy.name == "ddp" and moved.strategy.backend is None
    assert moved.trainer.devices == 2 and moved.data.batch_size == 7
    assert moved.model == cfg.model
    with pytest.raises(ConfigError, match="eval keeps the model and data set"):
        apply_overrides(cfg, ["model=rnn"])
    with pytest.raises(ConfigError, match="unknown config key 'trainer.nope'"):
        apply_overrides(cfg, ["trainer.nope=1"])
    for key in ("seed=3", "data.test_fraction=0.5", "data.val_fraction=0.3"):
        with pytest.raises(ConfigError, match="would score training samples as test"):
            apply_overrides(cfg, [key])
