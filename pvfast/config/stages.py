"""Run configuration of ``python -m pvfast.train``: one dataclass per stage, named presets, file + CLI overrides.

A stage config is composed of sections; every constant is a field whose default is documented inline::

    SFTStageConfig       model  data  optim  run  sft
    POStageConfig        model  data  optim  run  pairs  po   sft_adapter
    PipelineStageConfig  model  data  optim  run  sft  pairs  po          (SFT -> pairs -> PO -> evaluation)

The objective settings are the classes of :mod:`pvfast.objectives.config` (``TabpoConfig``, ``DpoConfig``, ...,
``SftConfig``) and pair generation is :class:`pvfast.data.pairs.PairConfig`, nested as they are.
``po.objective`` names the objective; ``po.objective_config`` is that objective's config, started from its
defaults or, for TAB-PO, from the preset named by ``po.preset`` ("released", "paper", "paper_b085").

Resolution order (later wins)::

    dataclass defaults  <  --preset NAME  <  --config FILE (YAML or JSON)  <  --key value overrides

File keys and command-line keys go through the same validation: an unknown key is an error that names it
and suggests close matches; a value of the wrong type or outside a field's choices is an error that names
the key, the expected type and the value. Changing ``po.objective`` or ``po.preset`` in a layer restarts
``po.objective_config`` from the new objective's defaults (or preset) before that layer's
``po.objective_config.*`` keys apply, so settings of one objective never leak into another.

Command lines::

    python -m pvfast.train                                     # pipeline, preset "tiny": CPU, minutes
    python -m pvfast.train sft --preset qwen2.5-1.5b --data.train train.jsonl --data.validation val.jsonl
    python -m pvfast.train po --preset llama-3.1-8b --config run.yaml --sft_adapter runs/sft/adapter \
        --po.objective dpo --po.objective_config.beta 0.3
    python -m pvfast.train pipeline --preset tiny --model.quant nf4 --optim.lr=1e-3 --run.resume

Values: bools ``true/false/1/0/yes/no``; ``none``/``null`` for optional fields; tuples as comma lists
(``--model.lora_targets q_proj,v_proj``); a bare ``--key`` means ``true``. Dashes in keys read as
underscores (``--po.precompute-ref``), and a few flags have short aliases (see :data:`ALIASES`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml

from pvfast.config.presets import DEFAULT_PRESET, NO_PRESET, PRESETS, PUBLISHED_MODELS  # noqa: F401
from pvfast.config.sections import DataConfig, ModelConfig, OptimConfig, PairConfig, RunConfig, _type_hints
from pvfast.objectives.config import OBJECTIVE_CONFIGS, PREFERENCE_OBJECTIVES, ObjectiveConfig, SftConfig, TabpoConfig
from pvfast.objectives.config import PRESETS as TABPO_PRESETS
from pvfast.objectives.config import default_config as default_objective_config

STAGES = ("sft", "po", "pipeline")
DEFAULT_STAGE = "pipeline"

#: Objectives the ``po`` section accepts: every registered pairwise objective (SFT is the ``sft`` section's).




class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key, what was expected and why."""


# --------------------------------------------------------------------------------------------------
# Field checks shared by the sections
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTSection:
    """The SFT stage's objective: weighted NLL of the gold completion (SPEC §3)."""

    objective_config: SftConfig = SftConfig()  # token weighting on by default; reduction "token"

    def __post_init__(self) -> None:
        if not isinstance(self.objective_config, SftConfig):
            raise TypeError(f"SFTSection.objective_config: expected SftConfig, "
                            f"got {type(self.objective_config).__name__}")


@dataclass(frozen=True)
class POSection:
    """The preference stage's objective (SPEC §3) and its reference."""

    objective: str = "tabpo"  # one of PREFERENCE_OBJECTIVES: tabpo dpo ipo cal_dpo dpo_positive simpo
    preset: str | None = None  # TAB-PO only: "released" | "paper" | "paper_b085"; None = TabpoConfig defaults
    # The objective's config (TabpoConfig, DpoConfig, ...): defaults of ``objective`` or its ``preset``.
    objective_config: ObjectiveConfig = TabpoConfig()
    # Score every completion with the reference once before training and cache it on disk (no reference
    # forward per step); False = the reference runs each step (adapters disabled, no grad).
    precompute_ref: bool = False

    def __post_init__(self) -> None:
        if self.objective not in PREFERENCE_OBJECTIVES:
            raise ValueError(f"POSection.objective must be one of {PREFERENCE_OBJECTIVES}, got {self.objective!r}")
        if self.preset is not None:
            if self.objective != "tabpo":
                raise ValueError(f"POSection.preset names a TAB-PO preset; objective is {self.objective!r}")
            if self.preset not in TABPO_PRESETS:
                raise ValueError(f"POSection.preset must be one of {sorted(TABPO_PRESETS)} or None, "
                                 f"got {self.preset!r}")
        expected = OBJECTIVE_CONFIGS[self.objective]
        if type(self.objective_config) is not expected:
            raise TypeError(f"POSection.objective_config: objective {self.objective!r} takes "
                            f"{expected.__name__}, got {type(self.objective_config).__name__}")

    @staticmethod
    def initial_objective_config(objective: str, preset: str | None) -> ObjectiveConfig:
        """The objective config a section starts from: the TAB-PO preset, else the objective's defaults."""
        if preset is not None and objective == "tabpo":
            return TabpoConfig.from_preset(preset)
        return default_objective_config(objective)


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTStageConfig:
    """``python -m pvfast.train sft``: supervised fine-tuning on the gold completions."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    sft: SFTSection = SFTSection()


@dataclass(frozen=True)
class POStageConfig:
    """``python -m pvfast.train po``: preference optimization from an SFT adapter."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    pairs: PairConfig = PairConfig()  # used when data.train holds examples rather than preference records
    po: POSection = POSection()
    # PEFT adapter directory of the SFT model PO starts from (the reference is that model, SPEC §3);
    # None = start from the base model itself.
    sft_adapter: str | None = None


@dataclass(frozen=True)
class PipelineStageConfig:
    """``python -m pvfast.train pipeline``: SFT -> confusion-aware pairs (SPEC §4) -> PO -> evaluation."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()  # the same recipe for both training stages, as published (SPEC §6)
    run: RunConfig = RunConfig()  # each stage writes under run.output_dir/<stage>
    sft: SFTSection = SFTSection()
    pairs: PairConfig = PairConfig()
    po: POSection = POSection()


StageConfig = Union[SFTStageConfig, POStageConfig, PipelineStageConfig]
STAGE_CONFIGS: Mapping[str, type] = {"sft": SFTStageConfig, "po": POStageConfig, "pipeline": PipelineStageConfig}


def stage_of(cfg: StageConfig) -> str:
    """The stage name of a stage config."""
    for stage, cls in STAGE_CONFIGS.items():
        if type(cfg) is cls:
            return stage
    raise TypeError(f"not a stage config: {type(cfg).__name__}")


#: Short command-line flags (SPEC / issue wording) and the dotted keys they stand for.
ALIASES: Mapping[str, str] = {
    "quant": "model.quant",
    "resume": "run.resume",
    "precompute_ref": "po.precompute_ref",
    "truncate": "data.truncate",
    "output_dir": "run.output_dir",
    "merge_adapter": "run.merge_adapter",
}


# --------------------------------------------------------------------------------------------------
# Values: parsing and type checks
# --------------------------------------------------------------------------------------------------

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null")


def _describe(hint) -> str:
    """A type as a user reads it in an error message."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _describe(a) for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a comma list of {_describe(args[0])}"
        return f"{len(args)} comma-separated values ({', '.join(_describe(a) for a in args)})"
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
    """Raised inside _coerce; _Builder turns it into a ConfigError naming the key and the source."""


def _coerce(value: Any, hint) -> Any:
    """``value`` (a CLI string or a parsed YAML/JSON value) as type ``hint``; _BadValue when it is not one."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _BadValue:
                pass
        raise _BadValue
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, str) and value in choices:
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
            return tuple(_coerce(item, args[0]) for item in items)
        if len(items) != len(args):
            raise _BadValue
        return tuple(_coerce(item, arg) for item, arg in zip(items, args))
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
    raise TypeError(f"pvfast.config.stages: no parser for field type {hint!r}")


# --------------------------------------------------------------------------------------------------
# Building a config from nested updates
# --------------------------------------------------------------------------------------------------


def _is_section(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def all_keys(cfg) -> list[str]:
    """Every dotted key of a config, leaves and sections (``po.objective_config`` follows the objective)."""
    keys: list[str] = []

    def walk(obj, prefix: str) -> None:
        hints = _type_hints(type(obj))
        for name in _field_names(type(obj)):
            path = _join(prefix, name)
            keys.append(path)
            value = getattr(obj, name)
            if _is_section(hints[name]) or isinstance(value, ObjectiveConfig):
                walk(value, path)

    walk(cfg, "")
    return keys


class _Builder:
    """Applies one layer of nested updates (a preset, a file, the command line) to a config."""

    def __init__(self, origin: str, known_keys: Sequence[str]):
        self.origin = origin  # "preset 'tiny'", "run.yaml", "command line": named in every error
        self.known_keys = list(known_keys)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{key}: {message} (from {self.origin})")

    def unknown(self, key: str, local: Sequence[str]) -> ConfigError:
        leaf = key.rsplit(".", 1)[-1]
        candidates = difflib.get_close_matches(key, list(local) + self.known_keys, n=3, cutoff=0.6)
        close_leaves = set(difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in self.known_keys],
                                                     n=3, cutoff=0.75))
        candidates += [k for k in self.known_keys if k.rsplit(".", 1)[-1] in close_leaves]
        suggestions = list(dict.fromkeys(candidates))[:4]
        hint = f"; did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else \
            f"; valid keys here: {', '.join(local)}"
        return self.error(key, f"unknown key{hint}")

    def value(self, value: Any, hint, key: str) -> Any:
        try:
            return _coerce(value, hint)
        except _BadValue:
            message = f"expected {_describe(hint)}, got {value!r}"
            if typing.get_origin(hint) is Literal and isinstance(value, str):
                close = difflib.get_close_matches(value, [str(c) for c in typing.get_args(hint)], n=1)
                if close:
                    message += f"; did you mean {close[0]!r}?"
            raise self.error(key, message) from None

    def section(self, base, updates: Any, prefix: str):
        """``base`` (a dataclass instance) with ``updates`` (a nested mapping) applied and validated."""
        cls = type(base)
        if not isinstance(updates, Mapping):
            raise self.error(prefix, f"expected a mapping of {cls.__name__} fields, got {updates!r}")
        if cls is POSection:
            return self.po_section(base, updates, prefix)
        hints = _type_hints(cls)
        names = _field_names(cls)
        changes = {}
        for key, value in updates.items():
            path = _join(prefix, str(key))
            if key not in names:
                raise self.unknown(path, [_join(prefix, n) for n in names])
            if _is_section(hints[key]) or isinstance(getattr(base, key), ObjectiveConfig):
                changes[key] = self.section(getattr(base, key), value, path)
            else:
                changes[key] = self.value(value, hints[key], path)
        return self.replace(base, changes, prefix)

    def po_section(self, base: POSection, updates: Mapping, prefix: str) -> POSection:
        """The ``po`` section: objective and preset first, then the objective config they select."""
        names = _field_names(POSection)
        for key in updates:
            if key not in names:
                raise self.unknown(_join(prefix, str(key)), [_join(prefix, n) for n in names])
        hints = _type_hints(POSection)
        objective = base.objective
        if "objective" in updates:
            key = _join(prefix, "objective")
            objective = self.value(updates["objective"], hints["objective"], key)
            if objective not in PREFERENCE_OBJECTIVES:
                close = difflib.get_close_matches(objective, PREFERENCE_OBJECTIVES, n=1)
                raise self.error(key, f"expected one of {', '.join(PREFERENCE_OBJECTIVES)}, got {objective!r}"
                                 + (f"; did you mean {close[0]!r}?" if close else ""))
        preset = base.preset
        if "preset" in updates:
            key = _join(prefix, "preset")
            preset = self.value(updates["preset"], hints["preset"], key)
            if preset is not None and preset not in TABPO_PRESETS:
                raise self.error(key, f"expected one of {', '.join(sorted(TABPO_PRESETS))} or none, got {preset!r}")
        if objective != "tabpo" and "objective" in updates and "preset" not in updates:
            preset = None  # a TAB-PO preset does not carry over to another objective
        if (objective, preset) == (base.objective, base.preset):
            objective_config = base.objective_config
        else:
            objective_config = POSection.initial_objective_config(objective, preset)
        if "objective_config" in updates:
            objective_config = self.section(objective_config, updates["objective_config"],
                                            _join(prefix, "objective_config"))
        changes = {"objective": objective, "preset": preset, "objective_config": objective_config}
        if "precompute_ref" in updates:
            key = _join(prefix, "precompute_ref")
            changes["precompute_ref"] = self.value(updates["precompute_ref"], hints["precompute_ref"], key)
        return self.replace(base, changes, prefix)

    def replace(self, base, changes: dict, prefix: str):
        try:
            return dataclasses.replace(base, **changes)
        except (TypeError, ValueError) as err:  # the section's own checks (ranges, cross-field rules)
            message, key = str(err), prefix or type(base).__name__
            # Section checks say "<Class>.<field> must ..."; name the dotted key instead.
            named = re.match(rf"{type(base).__name__}\.(\w+)\b:? ?(.*)", message, re.S)
            if named and named.group(1) in _field_names(type(base)):
                key, message = _join(prefix, named.group(1)), named.group(2)
            else:  # other checks (e.g. losses.log_tau) name the bare field: use it if only one matches
                mentioned = [name for name in changes if re.search(rf"\b{name}\b", message)]
                if len(mentioned) == 1:
                    key = _join(prefix, mentioned[0])
            raise self.error(key, message) from None


def _apply(cfg, updates: Mapping, origin: str):
    return _Builder(origin, all_keys(cfg)).section(cfg, updates, "")


def _restrict_to_stage(preset: Mapping, stage: str) -> dict:
    names = _field_names(STAGE_CONFIGS[stage])
    return {section: values for section, values in preset.items() if section in names}


# --------------------------------------------------------------------------------------------------
# Command-line overrides and files
# --------------------------------------------------------------------------------------------------


def _normalize_key(raw: str) -> str:
    key = ".".join(part.replace("-", "_") for part in raw.split("."))
    return ALIASES.get(key, key)


def overrides_to_dict(overrides: Sequence[str]) -> dict:
    """Nested updates from ``--key value`` / ``--key=value`` / bare ``--flag`` (= true) tokens.

    Values stay strings here; they are parsed against the field types when applied. A key given twice
    keeps its last value.
    """
    tokens = list(overrides)
    nested: dict = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"command line: expected --key value, got {token!r}")
        body = token[2:]
        if "=" in body:
            raw_key, value = body.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            raw_key, value = body, tokens[i + 1]
            i += 2
        else:
            raw_key, value = body, "true"  # a bare flag
            i += 1
        key = _normalize_key(raw_key)
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"command line: malformed key {raw_key!r}")
        node = nested
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"command line: --{'.'.join(parts[:depth + 1])} is given a value and "
                                  f"also used as a section in --{key}")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"command line: --{key} is a section (set its keys, e.g. --{key}.<name>)")
        node[parts[-1]] = value
    return nested


def read_config_file(path: str | os.PathLike) -> dict:
    """The nested mapping in a YAML (.yaml/.yml) or JSON (.json) config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r}; use .yaml, .yml or .json")
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}:{err.colno}: not valid JSON: {err.msg}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def default_stage_config(stage: str) -> StageConfig:
    """The dataclass defaults of ``stage``."""
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    return STAGE_CONFIGS[stage]()


def load_config(stage: str, config_file: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                preset: str | None = None) -> StageConfig:
    """The resolved config of ``stage``: defaults < ``preset`` < ``config_file`` < ``overrides``.

    Args:
        stage: "sft", "po" or "pipeline".
        config_file: a YAML or JSON file of nested sections (a saved config reloads as is), or None.
        overrides: command-line tokens, e.g. ``["--optim.lr", "1e-4", "--po.objective=dpo"]``.
        preset: a name in :data:`PRESETS`, or None / "none" for the plain dataclass defaults.
    Raises:
        ConfigError: naming the key, what was expected, the value and where it came from.
    """
    cfg = default_stage_config(stage)
    if preset is not None and preset != NO_PRESET:
        if preset not in PRESETS:
            close = difflib.get_close_matches(preset, list(PRESETS), n=1)
            raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
        cfg = _apply(cfg, _restrict_to_stage(PRESETS[preset], stage), f"preset {preset!r}")
    if config_file is not None:
        cfg = _apply(cfg, read_config_file(config_file), str(config_file))
    if overrides:
        cfg = _apply(cfg, overrides_to_dict(overrides), "command line")
    return cfg


def config_to_dict(cfg) -> dict:
    """A JSON-serialisable nested dict of ``cfg`` (tuples become lists; objective configs included)."""

    def convert(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [convert(v) for v in value]
        return value

    return convert(cfg)


def config_from_dict(stage: str, data: Mapping) -> StageConfig:
    """The config of ``stage`` from a (possibly partial) nested dict, validated like a config file."""
    return _apply(default_stage_config(stage), data, "dict")


def save_config(cfg, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as JSON (or YAML for .yaml/.yml) atomically: a temporary file renamed into place."""
    path = Path(path)
    data = config_to_dict(cfg)
    if path.suffix.lower() in (".yaml", ".yml"):
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def format_config(cfg) -> str:
    """The resolved config as indented YAML under a header line, for printing at the start of a run."""
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False).rstrip()
    return f"# pvfast {stage_of(cfg)} config\n{body}"


USAGE = """usage: python -m pvfast.train [sft|po|pipeline] [--config FILE] [--preset NAME] [--key value ...]

  stage        sft | po | pipeline (default: pipeline)
  --config     YAML or JSON file of nested sections (a saved config.json reloads as is)
  --preset     {presets} | none (default: tiny when neither --preset nor --config is given)
  --key value  dotted overrides, e.g. --optim.lr 1e-4 --po.objective dpo --po.objective_config.beta 0.3
               (also --key=value; a bare --flag means true; --help-keys lists every key of the stage)
"""


def format_keys(stage: str) -> str:
    """Every key of ``stage`` with its type and default, one per line (for ``--help-keys``)."""
    cfg = default_stage_config(stage)
    lines = []

    def walk(obj, prefix: str) -> None:
        hints = _type_hints(type(obj))
        for name in _field_names(type(obj)):
            value = getattr(obj, name)
            path = _join(prefix, name)
            if _is_section(hints[name]) or isinstance(value, ObjectiveConfig):
                walk(value, path)
            else:
                lines.append(f"  --{path}  {_describe(hints[name])}  (default {value!r})")

    walk(cfg, "")
    return f"keys of stage {stage!r}:\n" + "\n".join(lines)


def parse_cli(argv: Sequence[str]) -> tuple[str, str | None, str | None, list[str]]:
    """Split ``[stage] [--config FILE] [--preset NAME] [--key value ...]`` into its parts.

    The stage defaults to "pipeline". With neither ``--preset`` nor ``--config`` the preset is
    :data:`DEFAULT_PRESET` ("tiny"), so a bare ``python -m pvfast.train`` runs the CPU demo; pass
    ``--preset none`` for the plain defaults. ``--help`` / ``--help-keys`` print usage and exit.

    Returns:
        (stage, config_file or None, preset or None, override tokens for :func:`load_config`).
    """
    args = list(argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE.format(presets=" | ".join(PRESETS)))
        raise SystemExit(0)
    stage = DEFAULT_STAGE
    if args and not args[0].startswith("-"):
        if args[0] not in STAGES:
            raise ConfigError(f"command line: unknown stage {args[0]!r}; expected one of {', '.join(STAGES)}")
        stage = args.pop(0)
    if "--help-keys" in args:
        print(format_keys(stage))
        raise SystemExit(0)
    config_file = preset = None
    overrides: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        name, eq, inline = token.partition("=")
        if name in ("--config", "--preset"):
            if eq:
                value, i = inline, i + 1
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 2
            else:
                raise ConfigError(f"command line: {name} needs a value")
            if name == "--config":
                config_file = value
            else:
                preset = value
        else:
            overrides.append(token)
            i += 1
    if preset is None and config_file is None:
        preset = DEFAULT_PRESET
    overrides_to_dict(overrides)  # fail on malformed tokens now, before any file is read
    return stage, config_file, preset, overrides
