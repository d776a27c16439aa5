"""Loading `configs/*.py` files and applying `a.b=value` overrides from the command line.

A config file is a Python module with `get_config() -> ml_collections.ConfigDict` (see configs/base.py). The trainer,
the preprocessing job, eval and model-info all load configs through `load_config`, so an override means the same
thing everywhere and a typo in a field name fails loudly (the configs are locked).
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import ml_collections


class ConfigError(ValueError):
    """A config path or override the user gave cannot be applied."""


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Imports `path`, calls its `get_config()` and applies `overrides` ("a.b=value", value as a Python literal)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (expected e.g. configs/demo.py)")
    spec = importlib.util.spec_from_file_location(f"yagg_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config() function")
    config = module.get_config()
    for override in overrides:
        apply_override(config, override)
    return config


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Sets one `dotted.name=value` override; the value is parsed as a Python literal, else taken as a string."""
    name, sep, raw = override.partition("=")
    name = name.strip().removeprefix("--").removeprefix("config.")
    if not sep or not name:
        raise ConfigError(f"override {override!r} is not of the form name.sub=value")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    *parents, leaf = name.split(".")
    node = config
    for part in parents:
        if part not in node:
            raise ConfigError(f"override {override!r}: the config has no section {part!r}")
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"override {override!r}: the config has no field {name!r}")
    current = node[leaf]
    # Ints are accepted where floats are expected ("lr=1" means 1.0); tuples and lists are interchangeable.
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"override {override!r}: {e}") from e
