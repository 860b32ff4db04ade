"""The command line of ``python -m pvfast.train``: a stage, a preset, a config file and ``--key value`` overrides.

Resolution order (later wins)::

    dataclass defaults  <  --preset NAME  <  --config FILE (YAML or JSON)  <  --key value overrides

The stage configs are :mod:`pvfast.config.stages`, the presets :mod:`pvfast.config.presets`, the grammar and
the errors :mod:`pvfast.config.cli` and :mod:`pvfast.config.overrides`: file keys and command-line keys
go through the same validation, so an unknown key is an error that names it and suggests close matches,
and a value of the wrong type or outside a field's choices is an error that names the key, the expected
type, the value and where it came from.

Command lines::

    python -m pvfast.train                                     # pipeline, preset "tiny": CPU, minutes
    python -m pvfast.train sft --preset qwen2.5-1.5b --data.train train.jsonl --data.validation val.jsonl
    python -m pvfast.train po --preset llama-3.1-8b --config run.yaml --sft_adapter runs/sft/adapter \\
        --po.objective dpo --po.objective_config.beta 0.3
    python -m pvfast.train pipeline --preset tiny --model.quant nf4 --optim.lr=1e-3 --run.resume
    python -m pvfast.train sft --preset tiny --help-keys       # every key with the value this run would use

Values: bools ``true/false/1/0/yes/no`` (a bare ``--flag`` is true, ``--no-flag`` false); ``none``/``null``
for optional fields; lists as comma lists or several values (``--model.lora_targets q_proj v_proj``).
Dashes in keys read as underscores (``--po.precompute-ref``), and a few flags have short aliases
(:data:`ALIASES`).
"""

from __future__ import annotations

import difflib
import os
from typing import Mapping, Sequence

from pvfast.config.cli import (
    HELP_FLAGS,
    HELP_KEYS_FLAG,
    emit,
    format_exit_codes,
    format_keys,
    split_tokens,
    take_option,
)
from pvfast.config.cli import resolve as resolve_layers
from pvfast.config.overrides import ConfigError, apply_updates, field_names
from pvfast.config.presets import DEFAULT_PRESET, NO_PRESET, PRESETS
from pvfast.config.serialize import format_config as format_config_as
from pvfast.config.stages import DEFAULT_STAGE, STAGE_CONFIGS, STAGES, StageConfig, stage_of

PROG = "python -m pvfast.train"

#: Short command-line flags (SPEC / issue wording) and the dotted keys they stand for.
ALIASES: Mapping[str, str] = {
    "quant": "model.quant",
    "resume": "run.resume",
    "precompute_ref": "po.precompute_ref",
    "truncate": "data.truncate",
    "output_dir": "run.output_dir",
    "merge_adapter": "run.merge_adapter",
}


def default_stage_config(stage: str) -> StageConfig:
    """The dataclass defaults of ``stage``."""
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    return STAGE_CONFIGS[stage]()


def _restrict_to_stage(preset: Mapping, stage: str) -> dict:
    names = field_names(STAGE_CONFIGS[stage])
    return {section: values for section, values in preset.items() if section in names}


def load_config(stage: str, config_file: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                preset: str | None = None) -> StageConfig:
    """The resolved config of ``stage``: defaults < ``preset`` < ``config_file`` < ``overrides``.

    Args:
        stage: "sft", "po" or "pipeline".
        config_file: a YAML or JSON file of nested sections (a saved config reloads as is), or None.
        overrides: command-line tokens, e.g. ``["--optim.lr", "1e-4", "--po.objective=dpo"]``.
        preset: a name in :data:`pvfast.config.presets.PRESETS`, or None / "none" for the plain defaults.
    Raises:
        ConfigError: naming the key, what was expected, the value and where it came from.
    """
    cfg = default_stage_config(stage)
    if preset is not None and preset != NO_PRESET:
        if preset not in PRESETS:
            close = difflib.get_close_matches(preset, list(PRESETS), n=1)
            raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
        cfg = apply_updates(cfg, _restrict_to_stage(PRESETS[preset], stage), f"preset {preset!r}")
    return resolve_layers(cfg, None if config_file is None else os.fspath(config_file), overrides, ALIASES)


def config_from_dict(stage: str, data: Mapping) -> StageConfig:
    """The config of ``stage`` from a (possibly partial) nested dict, validated like a config file."""
    return apply_updates(default_stage_config(stage), data, "dict")


def format_config(cfg: StageConfig) -> str:
    """The resolved config as indented YAML under a header line, for printing at the start of a run."""
    return format_config_as(cfg, f"pvfast {stage_of(cfg)} config")


def _preset_line(name: str, preset: Mapping) -> str:
    model = preset.get("model", {})
    source = model.get("name_or_path") or f"the embedded tiny {model.get('tiny_arch', 'qwen2')} model"
    default = "  (default)" if name == DEFAULT_PRESET else ""
    return f"  {name:<16} {source}{default}"


def format_usage(exit_codes: Mapping[int, str] | None = None) -> str:
    """``--help`` of the trainer: usage, the stages, the presets and the exit codes."""
    presets = "\n".join(_preset_line(name, preset) for name, preset in PRESETS.items())
    text = f"""usage: {PROG} [sft|po|pipeline] [--config FILE] [--preset NAME] [--key value ...]

  stage        sft | po | pipeline (default: {DEFAULT_STAGE})
  --config     YAML or JSON file of nested sections (a saved config.json reloads as is)
  --preset     a name below, or {NO_PRESET} for the plain defaults (default: {DEFAULT_PRESET} when neither
               --preset nor --config is given)
  --key value  dotted overrides, e.g. --optim.lr 1e-4 --po.objective dpo --po.objective_config.beta 0.3
               (also --key=value; a bare --flag means true, --no-flag false; several values fill a list)
  --help-keys  every key of the stage with its type, doc and the value this command line resolves to
               (after the preset, the --config file and the overrides given before or after it)

presets:
{presets}"""
    if exit_codes:
        text += "\n\n" + format_exit_codes(exit_codes)
    return text


def parse_cli(argv: Sequence[str], exit_codes: Mapping[int, str] | None = None
              ) -> tuple[str, str | None, str | None, list[str]]:
    """Split ``[stage] [--config FILE] [--preset NAME] [--key value ...]`` into its parts.

    The stage defaults to "pipeline". With neither ``--preset`` nor ``--config`` the preset is
    :data:`pvfast.config.presets.DEFAULT_PRESET` ("tiny"), so a bare ``python -m pvfast.train`` runs the
    CPU demo; pass ``--preset none`` for the plain defaults. ``--help`` prints usage, the presets and
    ``exit_codes`` (``{status: meaning}``, from :mod:`pvfast.train.errors`), ``--help-keys`` every key with
    the value this command line resolves to; both exit 0.

    Returns:
        (stage, config_file or None, preset or None, override tokens for :func:`load_config`).
    """
    args = list(argv)
    if any(a in HELP_FLAGS for a in args):
        emit(format_usage(exit_codes))
        raise SystemExit(0)
    stage = DEFAULT_STAGE
    if args and not args[0].startswith("-"):
        if args[0] not in STAGES:
            close = difflib.get_close_matches(args[0], STAGES, n=1)
            raise ConfigError(f"command line: unknown stage {args[0]!r}; expected one of {', '.join(STAGES)}"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
        stage = args.pop(0)
    show_keys = HELP_KEYS_FLAG in args
    args = [a for a in args if a != HELP_KEYS_FLAG]
    config_file = take_option(args, "--config")
    preset = take_option(args, "--preset")
    if preset is None and config_file is None:
        preset = DEFAULT_PRESET
    split_tokens(args)  # fail on malformed tokens now, before any file is read
    if show_keys:
        cfg = load_config(stage, config_file, args, preset)
        origin = f"preset {preset!r}" if preset not in (None, NO_PRESET) else "defaults"
        origin += (f" < {config_file}" if config_file else "") + (" < command line" if args else "")
        emit(format_keys(cfg, ALIASES, title=f"keys of stage {stage!r} (values from {origin}):"))
        raise SystemExit(0)
    return stage, config_file, preset, args

