"""The override engine: typed values, nested updates of frozen dataclass configs, and errors that name the key.

One layer of updates (a preset, a ``--config`` file, the command line) is a nested mapping of field names to
values; :func:`apply_updates` returns the config with the layer applied and validated. Every refusal is a
:class:`ConfigError` naming the dotted key, what was expected, the value and the layer it came from::

    optim.lrr: unknown key; did you mean 'optim.lr'? (from command line)
    optim.lr: expected a float, got 'fast' (from run.yaml)
    model.quant: expected one of 'none', 'nf4', got 'nf8'; did you mean 'nf4'? (from command line)
    optim.warmup_ratio: must be in [0, 1), got 1.5 (from command line)

The engine is generic: it knows dataclasses, type hints and two declared hooks, nothing about pvfast's
sections.

- A field is a nested section when its declared type is a dataclass, or when its current value is one (so
  ``po.objective_config`` walks whichever objective config the section holds now).
- Values are parsed against the field's type hint: bool, int, float, str, ``X | None``, ``Literal[...]``,
  ``tuple[X, ...]`` and fixed ``tuple[X, Y]``. Command-line strings are parsed (``true/false/1/0/yes/no``,
  ``none``/``null``, comma lists); file values must already have the type (YAML's ``1e-4``, a string in
  YAML 1.1, is read as a float).
- Section checks raise :class:`pvfast.config.checks.FieldError`, which carries the field name: the error
  names ``<section>.<field>``. A section whose checks raise a plain ``ValueError``/``TypeError`` (the
  objective configs of :mod:`pvfast.objectives.config`) is diagnosed by applying each changed field alone:
  when exactly one of them fails by itself, the error names it, else the section.
- Dependent fields are declared by the section, not special-cased here: a class attribute
  ``config_restarts = {"objective_config": ("objective", "preset")}`` says that when ``objective`` or
  ``preset`` changes in a layer, ``objective_config`` starts over from ``cls.restart_field(name, values)``
  before the layer's own ``objective_config.*`` keys apply (so one objective's settings never leak into
  another's). Restarts run in the declared order; a field set explicitly in the layer is not restarted.
- ``check_complete(self)``, when a config class defines it, holds the checks that need every layer
  (required keys, keys that need each other); :func:`check_complete` runs it after the last layer.

Why hand-written and not a library. Tried in a scratch venv on these very dataclasses (2026-10 releases):

- OmegaConf 2.4 structured configs (torchtune's choice; 2.5 MB, needs PyYAML): good per-key type errors
  (``full_key: optim.lr``) and "Did you mean" within one section, but no suggestion across sections
  (``--lr`` does not find ``optim.lr``), errors do not say which layer (file or command line) a value came
  from, ``__post_init__`` range checks surface as bare ``ValueError``/"Could not create instance of
  POSection" without the key, comma lists (``--model.lora_targets q_proj,v_proj``) are refused, frozen
  dataclasses become read-only configs, and switching ``po.objective`` cannot swap the ``objective_config``
  class (polymorphic sections are not supported): we would keep our own restart logic and CLI tokenizer.
- tyro 1.0 (1.8 MB + typeguard, docstring-parser, typing-extensions): excellent help from inline comments
  and "Perhaps you meant --optim.lr" suggestions, but no config-file layer or presets with validated keys,
  range errors say "Error parsing optim" without the field, ``--run.resume true`` is refused (bool flags
  take no value), the objective switch needs subcommands instead of a field, and it exits rather than
  raising, so callers cannot map refusals onto their own exit codes.
- jsonargparse 4.53 (1.7 MB, needs PyYAML): no suggestion for unknown keys ("unrecognized arguments"),
  range checks run only at instantiation, and it fails to build a parser for ``POStageConfig`` at all
  (``NSKeyError`` on the polymorphic ``po.objective_config``).

None keeps today's error quality (key, expected type, value, origin, close matches across sections) or
handles the objective switch; each would add 2-5 MB of dependencies and still need our own code around it.
Hand-written, the engine is about 250 lines of code here plus 200 for the command line
(:mod:`pvfast.config.cli`), plain Python with no dependency beyond PyYAML (config files), so it stays.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence, Union

import yaml

from pvfast.config.checks import FieldError, type_hints


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key, what was expected and why."""


class _Bare:
    """A command-line ``--flag`` given without a value: true for a bool field, an error for any other."""

    def __repr__(self) -> str:
        return "no value"


class _Negated:
    """A command-line ``--no-flag``: false for a bool field, an error for any other."""

    def __repr__(self) -> str:
        return "--no- (negation)"


BARE = _Bare()
NEGATED = _Negated()

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null")


# --------------------------------------------------------------------------------------------------
# Values: parsing and type checks
# --------------------------------------------------------------------------------------------------


def describe_type(hint) -> str:
    """A type as a user reads it in an error message or in ``--help-keys``."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join("None" if a is type(None) else describe_type(a) for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list, each {describe_type(args[0])} (comma-separated or several values)"
        return f"{len(args)} values ({', '.join(describe_type(a) for a in args)})"
    if hint is bool:
        return "a bool (true/false/1/0/yes/no)"
    if hint is int:
        return "an int"
    if hint is float:
        return "a float"
    if hint is str:
        return "a string"
    return getattr(hint, "__name__", str(hint))


class _BadValue(Exception):
    """Raised inside parse_value; the engine turns it into a ConfigError naming the key and the source."""


def _is_bool_hint(hint) -> bool:
    return hint is bool or (typing.get_origin(hint) in (Union, types.UnionType) and bool in typing.get_args(hint))


def parse_value(value: Any, hint) -> Any:
    """``value`` (a command-line string, a list of them, or a parsed YAML/JSON value) as type ``hint``.

    Raises _BadValue when it is not one (the caller names the key).
    """
    if value is BARE or value is NEGATED:
        if _is_bool_hint(hint):
            return value is BARE
        raise _BadValue
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_value(value, arg)
            except _BadValue:
                pass
        raise _BadValue
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(hint):
            return value
        raise _BadValue
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str):
            items = [item.strip() for item in value.split(",")] if value.strip() else []
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise _BadValue
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(item, args[0]) for item in items)
        if len(items) != len(args):
            raise _BadValue
        return tuple(parse_value(item, arg) for item, arg in zip(items, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise _BadValue
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _BadValue from None
        raise _BadValue
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())  # YAML 1.1 reads "1e-4" (no dot) as a string
            except ValueError:
                raise _BadValue from None
        raise _BadValue
    if hint is str:
        if isinstance(value, str):
            return value
        raise _BadValue
    raise TypeError(f"pvfast.config.overrides: no parser for field type {hint!r}")


# --------------------------------------------------------------------------------------------------
# Walking configs
# --------------------------------------------------------------------------------------------------


def join_key(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def is_section(hint, value: Any) -> bool:
    """Whether a field is a nested section: a dataclass by its declared type or by its current value."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return True
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def iter_fields(cfg, prefix: str = "") -> Iterator[tuple[str, Any, Any, bool]]:
    """``(dotted key, type hint, value, is_section)`` for every field of ``cfg``, depth first."""
    hints = type_hints(type(cfg))
    for name in field_names(type(cfg)):
        value = getattr(cfg, name)
        path = join_key(prefix, name)
        nested = is_section(hints[name], value)
        yield path, hints[name], value, nested
        if nested:
            yield from iter_fields(value, path)


def all_keys(cfg) -> list[str]:
    """Every dotted key of a config, leaves and sections (``po.objective_config`` follows the objective)."""
    return [path for path, _, _, _ in iter_fields(cfg)]


def leaf_fields(cfg) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (type hint, value)}`` of every leaf (non-section) field of ``cfg``."""
    return {path: (hint, value) for path, hint, value, nested in iter_fields(cfg) if not nested}


# --------------------------------------------------------------------------------------------------
# Applying one layer of nested updates
# --------------------------------------------------------------------------------------------------


class _Layer:
    """Applies one layer of nested updates (a preset, a file, the command line) to a config."""

    def __init__(self, origin: str, known_keys: Sequence[str]):
        self.origin = origin  # "preset 'tiny'", "run.yaml", "command line": named in every error
        self.known_keys = list(known_keys)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{key}: {message} (from {self.origin})")

    def unknown(self, key: str, local: Sequence[str], owner: type) -> ConfigError:
        if key in self.known_keys:  # valid before this layer swapped the section (e.g. another objective)
            return self.error(key, f"unknown key: {owner.__name__} has no field {key.rsplit('.', 1)[-1]!r}; "
                                   f"valid keys here: {', '.join(local)}")
        leaf = key.rsplit(".", 1)[-1]
        candidates = difflib.get_close_matches(key, list(local) + self.known_keys, n=3, cutoff=0.6)
        close_leaves = set(difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in self.known_keys],
                                                     n=3, cutoff=0.75))
        candidates += [k for k in self.known_keys if k.rsplit(".", 1)[-1] in close_leaves]
        # not the section the key is already in ("optim" for "optim.lrr")
        suggestions = [c for c in dict.fromkeys(candidates) if not key.startswith(c + ".")][:4]
        hint = f"; did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else \
            f"; valid keys here: {', '.join(local)}"
        return self.error(key, f"unknown key{hint}")

    def value(self, value: Any, hint, key: str) -> Any:
        try:
            return parse_value(value, hint)
        except _BadValue:
            if value is BARE:
                message = f"needs a value ({describe_type(hint)})"
            elif value is NEGATED:
                message = f"--no-{key} applies to bool keys only; this one takes {describe_type(hint)}"
            else:
                message = f"expected {describe_type(hint)}, got {value!r}"
            if typing.get_origin(hint) is Literal and isinstance(value, str):
                close = difflib.get_close_matches(value, [str(c) for c in typing.get_args(hint)], n=1)
                if close:
                    message += f"; did you mean {close[0]!r}?"
            raise self.error(key, message) from None

    def section(self, base, updates: Any, prefix: str):
        """``base`` (a dataclass instance) with ``updates`` (a nested mapping) applied and validated."""
        cls = type(base)
        names = field_names(cls)
        if not isinstance(updates, Mapping):
            shown = updates if updates is not BARE else "no value"
            raise self.error(prefix or cls.__name__, f"expected a mapping of {cls.__name__} fields, got {shown!r}")
        for key in updates:
            if key not in names:
                raise self.unknown(join_key(prefix, str(key)), [join_key(prefix, n) for n in names], cls)
        hints = type_hints(cls)
        values = {name: getattr(base, name) for name in names}
        nested = {name for name in updates if is_section(hints[name], values[name])}
        for name in updates:  # leaves first: restarts read the new values of their sources
            if name not in nested:
                values[name] = self.value(updates[name], hints[name], join_key(prefix, name))
        changed = {name for name in updates if name not in nested and values[name] != getattr(base, name)}
        for target, sources in getattr(cls, "config_restarts", {}).items():
            if target in updates and target not in nested:
                continue  # set explicitly in this layer
            if changed & set(sources):
                values[target] = cls.restart_field(target, dict(values))
                changed.add(target)
        for name in nested:
            values[name] = self.section(values[name], updates[name], join_key(prefix, name))
            changed.add(name)
        return self.replace(base, {name: values[name] for name in names if name in changed}, prefix)

    def replace(self, base, changes: dict, prefix: str):
        """``dataclasses.replace`` whose failures (the section's own checks) name the offending key."""
        try:
            return dataclasses.replace(base, **changes)
        except FieldError as err:
            if err.owner == type(base).__name__ and err.field in field_names(type(base)):
                raise self.error(join_key(prefix, err.field), err.problem) from None
            raise self.error(prefix or type(base).__name__, str(err)) from None
        except (TypeError, ValueError) as err:
            # A check that does not say which field it refused: the field that fails on its own is the one.
            culprits = [name for name in changes if not _replace_ok(base, name, changes[name])]
            key = join_key(prefix, culprits[0]) if len(culprits) == 1 else (prefix or type(base).__name__)
            raise self.error(key, str(err)) from None


def _replace_ok(base, name: str, value: Any) -> bool:
    try:
        dataclasses.replace(base, **{name: value})
    except (TypeError, ValueError):
        return False
    return True


def apply_updates(cfg, updates: Mapping, origin: str):
    """``cfg`` with one layer of nested ``updates`` applied; ConfigError names key, value and ``origin``."""
    return _Layer(origin, all_keys(cfg)).section(cfg, updates, "")


def check_complete(cfg):
    """Run ``cfg.check_complete()`` when the class defines it (checks that need every layer); returns cfg."""
    check = getattr(cfg, "check_complete", None)
    if check is None:
        return cfg
    try:
        check()
    except FieldError as err:
        raise ConfigError(f"{err.field}: {err.problem}") from None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg


def config_from_dict(cls_or_cfg, data: Mapping, origin: str = "dict"):
    """A config from a (possibly partial) nested dict over the defaults of ``cls_or_cfg`` (a class or an
    instance), validated like a config file."""
    base = cls_or_cfg() if isinstance(cls_or_cfg, type) else cls_or_cfg
    return apply_updates(base, data, origin)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def read_config_file(path: str | os.PathLike) -> dict:
    """The nested mapping in a YAML (.yaml/.yml) or JSON (.json) config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: unknown config format {suffix!r}; use .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file ({err})") from None
    try:
        data = yaml.safe_load(text) if suffix in (".yaml", ".yml") else json.loads(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}:{err.colno}: not valid JSON: {err.msg}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data
