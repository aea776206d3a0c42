"""Composing a config: the packaged tree, an experiment file, shell overrides.

Imports Hydra and OmegaConf only (no torch), so `dltrain config show` is quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from dltrain.trainers.errors import ConfigError
from dltrain.trainers.schema import GROUPS, validate


def compose(
    config_file: Path | None, overrides: list[str]
) -> tuple[DictConfig, list[str]]:
    """Compose and validate a config; return it with every override applied.

    The experiment file comes first, the shell's overrides after it, so the
    shell wins. The returned overrides are what the manifest records.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_override_words(overrides)
    file_overrides = experiment_overrides(config_file) if config_file else []
    all_overrides = file_overrides + list(overrides)
    try:
        with initialize_config_module("dltrain.configs", version_base="1.3"):
            cfg = hydra_compose("config", overrides=all_overrides)
        OmegaConf.to_container(cfg, resolve=True)  # surface bad ${...} now
    except (HydraException, OmegaConfBaseException, ValueError, TypeError) as err:
        raise ConfigError(_hydra_message(err, config_file, file_overrides)) from None
    return validate(cfg), all_overrides


def check_override_words(overrides: list[str]) -> None:
    """Refuse a word that cannot be an override: no key, or an option."""
    for override in overrides:
        if override.startswith("="):
            raise ConfigError(f"override {override!r} has no key; write key=value")
        if override.startswith("-"):
            raise ConfigError(
                f"unknown option {override!r}; options go before the overrides, "
                "see --help"
            )


def experiment_overrides(path: Path) -> list[str]:
    """Turn an experiment YAML file into Hydra overrides.

    The file may select group options (``model: rnn`` at the top, or a
    ``defaults:`` list with ``- model: rnn`` / ``- override /model: rnn``) and
    set values (nested mappings such as ``trainer: {max_epochs: 3}``).
    """
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder; give an experiment YAML file")
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"--config {path}: not valid YAML ({_first_line(err)})"
        ) from None
    if not isinstance(content, dict):
        raise ConfigError(
            f"--config {path}: expected a mapping of keys to values at the top"
        )
    choices: list[str] = []
    values: list[str] = []
    defaults = content.pop("defaults", None) or []
    if not isinstance(defaults, list):
        raise ConfigError(
            f"--config {path}: defaults must be a list such as '- model: rnn'"
        )
    for entry in defaults:
        if entry == "_self_":
            continue
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(
                f"--config {path}: defaults entry {entry!r} should look like '- model: rnn'"
            )
        ((group, option),) = entry.items()
        group = str(group).removeprefix("override").strip().lstrip("/")
        choices.append(f"{group}={option}")
    for key, value in content.items():
        if key in GROUPS and isinstance(value, str):
            choices.append(f"{key}={value}")
        elif key in GROUPS and not isinstance(value, dict):
            raise ConfigError(
                f"--config {path}: {key}: {value!r} should name an option "
                f"({key}: {next(iter(GROUPS[key]))}) or set values ({key}: {{...}})"
            )
        else:
            values += _flatten(str(key), value)
    return choices + values


def _flatten(key: str, value: Any) -> list[str]:
    if isinstance(value, dict) and value:
        return [item for k, v in value.items() for item in _flatten(f"{key}.{k}", v)]
    return [f"{key}={_encode(value)}"]


def _encode(value: Any) -> str:
    """A YAML value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_encode(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_encode(v)}" for k, v in value.items()) + "}"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _hydra_message(
    err: Exception, config_file: Path | None, from_file: list[str]
) -> str:
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    if "Interpolation" in type(err).__name__ or "Interpolation" in first:
        key = getattr(err, "full_key", "") or "a value"
        return (
            f"{key}: cannot resolve its ${{...}} reference ({first}); fix or remove it"
        )
    if "Could not find" in first or "Could not load" in first:
        # e.g. "In 'config': Could not find 'model/foo'" + "Available options in 'model':"
        group_option = first.split("'")[-2] if first.count("'") >= 2 else ""
        group, _, option = group_option.partition("/")
        if group in GROUPS:
            return (
                f"{group}={option!r} is not a known {group}; "
                f"choose one of: {', '.join(GROUPS[group])}"
            )
    if first.startswith("Could not override '") and "+" in text:
        key = first.split("'")[1]
        from_this_file = any(o.startswith(key + "=") for o in from_file)
        where = f" (from --config {config_file})" if from_this_file else ""
        hint = "" if "." in key else f", or add a new top-level key with +{key}=VALUE"
        return (
            f"unknown config key {key!r}{where}; check the spelling with "
            f"`dltrain config show`{hint}"
        )
    return " ".join(lines[:3])


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# Keys that choose the split or the model's input: fixed once a model is trained.
SPLIT_KEYS = (
    "seed",
    "data.val_fraction",
    "data.test_fraction",
    "data.fold",
    "data.folds",
    "data.window",
)


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """Apply shell overrides to a saved run config (for `dltrain eval`).

    Values (``trainer.devices=2``, ``data.root=...``) and the ``strategy=``
    group can change; the trained model and data set stay what they were.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(f"cannot parse overrides: {_first_line(err)}") from None
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    for override in parsed:
        key, value = override.key_or_group, override.value()
        if key in SPLIT_KEYS:
            raise ConfigError(
                f"{key}={value}: {key} decides which samples are test samples; "
                "changing it at eval would score training samples as test. Eval keeps "
                "the run's seed, split fractions and fold"
            )
        if key in GROUPS:
            if key != "strategy":
                raise ConfigError(
                    f"{key}={value}: eval keeps the model and data set the run was trained "
                    "with; change strategy=, trainer.* or data.batch_size/num_workers/"
                    "root/path instead"
                )
            cfg.strategy = _packaged_option(key, str(value))
            continue
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(
                f"unknown config key {key!r}; see the run's config.yaml for the keys"
            )
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, merge=False)
    return validate(cfg)


def _packaged_option(group: str, option: str) -> DictConfig:
    from importlib import resources

    from omegaconf import OmegaConf

    path = resources.files("dltrain.configs") / group / f"{option}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{group}={option!r} is not a known {group}; "
            f"choose one of: {', '.join(GROUPS[group])}"
        )
    return OmegaConf.create(path.read_text())
