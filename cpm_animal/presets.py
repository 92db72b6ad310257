"""cpm_animal's presets are YAML files (this folder's form of the plain preset dicts of the other train.py
files): `cpu.yaml` (the default) and `seed.yaml`, or any file given as `--preset PATH`. `group.key=value`
overrides from the command line change single values, e.g. `python cpm_animal/train.py model.drop_rate=0.1`.

Values are parsed as YAML (`1e-3`, `true`, `null`, `[0.05,0.1]`); a key that is not in the file is an
error, so a typo never silently does nothing.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path

import yaml

from common.data import BadInput

FOLDER = Path(__file__).parent
NAMES = ("cpu", "seed")


class PresetError(BadInput, ValueError):
    pass


def preset_path(name_or_path) -> Path:
    """cpu / seed -> the YAML file of that name in this folder; anything else is a path."""
    return FOLDER / f"{name_or_path}.yaml" if name_or_path in NAMES else Path(name_or_path)


def parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(preset: dict, override: str) -> None:
    """Sets preset[a][b] from the string "a.b=value" in place."""
    if "=" not in override:
        raise PresetError(f"override {override!r} is not of the form group.key=value")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = preset
    for depth, key in enumerate(keys[:-1]):
        if not isinstance(node.get(key), dict):
            raise PresetError(f"override {dotted!r}: {'.'.join(keys[:depth + 1])!r} is not a preset group")
        node = node[key]
    if keys[-1] not in node:
        close = difflib.get_close_matches(keys[-1], list(node), n=3) or sorted(node)
        raise PresetError(f"override {dotted!r}: unknown key {keys[-1]!r} (did you mean: "
                          f"{', '.join('.'.join([*keys[:-1], key]) for key in close)}?)")
    old, new = node[keys[-1]], parse_value(text)
    # a word where the file has a number (`trainer.max_epochs=abc`), or a non-boolean for a boolean, is a typo
    if (isinstance(old, (int, float)) and isinstance(new, str)) or (isinstance(old, bool) != isinstance(new, bool)
                                                                    and old is not None and new is not None):
        raise PresetError(f"override {dotted}={text}: expected {type(old).__name__} like {old!r}")
    node[keys[-1]] = new


def load_preset(name_or_path="cpu", overrides: list[str] | tuple = ()) -> dict:
    path = preset_path(name_or_path)
    try:
        preset = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise PresetError(f"{path}: cannot read preset: {error}") from None
    if not isinstance(preset, dict):
        raise PresetError(f"{path}: a preset file must hold a mapping of groups")
    preset = copy.deepcopy(preset)
    for override in overrides:
        apply_override(preset, override)
    return preset


def dump_preset(preset: dict) -> str:
    return yaml.safe_dump(preset, sort_keys=False)
