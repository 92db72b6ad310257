"""The YAML config of cpm_animal: load `config.yaml` (or `--config FILE`), then apply `group.key=value`
overrides from the command line, e.g. `python cpm_animal/train.py model.drop_rate=0.1 optimizer.name=sgd`.

Values are parsed as YAML (`1e-3`, `true`, `null`, `[0.05,0.1]`); a key that is not in the file is an
error, so a typo never silently does nothing.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")


class ConfigError(ValueError):
    pass


def parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(config: dict, override: str) -> None:
    """Sets config[a][b] from the string "a.b=value" in place."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form group.key=value")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = config
    for depth, key in enumerate(keys[:-1]):
        if not isinstance(node.get(key), dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:depth + 1])!r} is not a config group")
        node = node[key]
    if keys[-1] not in node:
        known = ", ".join(sorted(node))
        raise ConfigError(f"override {dotted!r}: unknown key {keys[-1]!r} (known here: {known})")
    node[keys[-1]] = parse_value(text)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> dict:
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read config: {error}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of groups")
    config = copy.deepcopy(config)
    for override in overrides:
        apply_override(config, override)
    return config


def dump_config(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)
