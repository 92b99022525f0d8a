"""Typed run configs from YAML files and command-line flags.

Precedence: dataclass defaults < a base (a recipe's options) < YAML file < flags given on the command line.
Unknown keys are refused with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def build_config(cls: type[T], yaml_path: str | Path | None, flags: dict[str, Any],
                 base: dict[str, Any] | None = None) -> T:
    """Instantiate dataclass ``cls`` from a YAML file and the flags that were set.

    Args:
        cls: a dataclass whose ``__post_init__`` validates it.
        yaml_path: optional YAML file with field values.
        flags: field values from the command line; ``None`` means "not given".
        base: field values below the YAML file's (e.g. a recipe's training options).

    Raises:
        ValueError: for keys that are not fields of ``cls``, and for fields without a default
            that neither gives.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values = load_yaml(yaml_path) if yaml_path else {}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{yaml_path}: unknown option(s) {unknown}; valid: {sorted(names)}")
    values = {**(base or {}), **values}
    values.update({k: v for k, v in flags.items() if v is not None})
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing required option(s) {', '.join('--' + m for m in missing)}: give them as flags"
                         + (f" or in {yaml_path}" if yaml_path else " (or in a --config YAML file)"))
    if "ignore" in values:
        values["ignore"] = tuple(values["ignore"])
    return cls(**values)

