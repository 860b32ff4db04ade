"""Configs as plain data: the one config-to-dict, the comparison checkpoints use, and atomic config files.

:func:`config_to_dict` is the JSON form every config is saved in (``output_dir/config.json``, each
checkpoint's ``config.json``) and printed from; :func:`pvfast.config.overrides.config_from_dict` reads it
back. Torch-free (it imports only :mod:`pvfast.atomic`, the stdlib file writer): a ``torch.dtype`` value
is recognised by its type's name, not by importing torch.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pvfast import atomic


def _plain(value: Any) -> Any:
    """``value`` as JSON data: dataclasses and mappings as dicts, tuples/lists/sets as lists, paths as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(item) for item in value)
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":  # torch.bfloat16 -> "bfloat16"
        return str(value).removeprefix("torch.")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"config value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def config_to_dict(config: Any) -> dict:
    """A config (a dataclass instance or a mapping) as plain JSON data: the form saved and compared.

    Nested dataclasses (objective configs included) become dicts, tuples become lists, paths strings,
    enums their values, a ``torch.dtype`` its name; mapping keys become strings as JSON writes them.
    """
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)) and not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping or a dataclass instance, got {type(config).__name__}")
    return json.loads(json.dumps(_plain(config)))


def _flatten(data: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def config_differences(a: Any, b: Any) -> list[str]:
    """Dotted keys whose values differ between configs ``a`` and ``b`` (or that only one has), sorted.

    Both go through :func:`config_to_dict`, so a tuple equals a list and a Path equals its string.
    Nested mappings are compared key by key (``"lora.r"``).
    """
    flat_a = _flatten(config_to_dict(a))
    flat_b = _flatten(config_to_dict(b))
    missing = object()  # distinguishes "absent" from a stored null
    return sorted(k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k, missing) != flat_b.get(k, missing))


def format_config(cfg, title: str) -> str:
    """``cfg`` as indented YAML under a ``# <title>`` line, for printing at the start of a run."""
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False).rstrip()
    return f"# {title}\n{body}"


def save_config(cfg, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as JSON (or YAML for .yaml/.yml) atomically (:func:`pvfast.atomic.write_text`)."""
    path = Path(path)
    data = config_to_dict(cfg)
    if path.suffix.lower() in (".yaml", ".yml"):
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    atomic.write_text(path, text)
    return path
