"""Command lines over dataclass configs: one grammar, ``--config FILE``, ``--help``, ``--help-keys``, one error style.

Every pvfast command (``python -m pvfast.train``, ``.evaluate``, ``.pairs``, ``.extract``) reads its
dataclass config the same way (later wins)::

    dataclass defaults  <  [--preset NAME, the trainer only]  <  --config FILE (YAML/JSON)  <  --key value

The grammar of the ``--key value`` tokens (:func:`tokens_to_updates`):

- ``--section.key value`` and ``--section.key=value``; dashes in keys read as underscores
  (``--max-new-tokens`` is ``max_new_tokens``); a command may declare aliases (``--quant`` for
  ``model.quant``, ``--seed`` for ``pairs.seed``).
- Several values after one key fill a list field (``--predictions a.jsonl b.jsonl``,
  ``--strategies label label missing extra``); a comma list does too (``--model.lora_targets q_proj,v_proj``).
- A bare ``--flag`` sets a bool to true and ``--no-flag`` to false (``--no-include-empty``,
  ``--no-run.evaluate``); bools also take ``true/false/1/0/yes/no``, optional fields ``none``/``null``.

Values are parsed and checked by the override engine (:mod:`pvfast.config.overrides`), so an unknown key,
a wrong type or a refused value is one ``error:`` line naming the key, the expected type, the value and
its origin (a file or the command line), with close matches suggested.

The API for a command (see :func:`parse_command`)::

    cfg = parse_command(argv, EvaluateCommandConfig, prog="python -m pvfast.evaluate", description=__doc__,
                        aliases=EVALUATE_ALIASES, exit_codes={0: "done", 2: "a data file was refused"})

Reserved flags (not config keys): ``--config``, ``--help``/``-h``, ``--help-keys``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import os
import re
import sys
import textwrap
import tokenize
from typing import Any, Mapping, Sequence

from pvfast.config.overrides import (
    BARE,
    NEGATED,
    ConfigError,
    all_keys,
    apply_updates,
    check_complete,
    describe_type,
    iter_fields,
    read_config_file,
)

HELP_FLAGS = ("-h", "--help")
HELP_KEYS_FLAG = "--help-keys"
CONFIG_FLAG = "--config"
#: The exit status of a refused command line or config file (argparse's convention, and the trainer's).
EXIT_BAD_CONFIG = 2


# --------------------------------------------------------------------------------------------------
# Tokens -> nested updates
# --------------------------------------------------------------------------------------------------


def normalize_key(raw: str) -> str:
    """``po.precompute-ref`` -> ``po.precompute_ref``."""
    return ".".join(part.replace("-", "_") for part in raw.split("."))


def split_tokens(tokens: Sequence[str]) -> list[tuple[str, list[str] | None]]:
    """``[(raw key, values)]`` from ``--key v1 v2 ...`` / ``--key=value`` / ``--flag`` tokens (syntax only).

    ``values`` is None for a bare flag; a ``--key=value`` token always has exactly one value.
    """
    tokens = list(tokens)
    items: list[tuple[str, list[str] | None]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"command line: expected --key value, got {token!r}")
        body = token[2:]
        i += 1
        if "=" in body:
            raw_key, value = body.split("=", 1)
            items.append((raw_key, [value]))
            continue
        values = []
        while i < len(tokens) and not tokens[i].startswith("--"):
            values.append(tokens[i])
            i += 1
        items.append((body, values or None))
    for raw_key, _ in items:
        if not all(raw_key.split(".")):
            raise ConfigError(f"command line: malformed key {raw_key!r}")
    return items


def tokens_to_updates(tokens: Sequence[str], cfg=None, aliases: Mapping[str, str] | None = None) -> dict:
    """Nested updates for :func:`pvfast.config.overrides.apply_updates` from command-line tokens.

    Values stay strings (one value), lists of strings (several) or markers (a bare ``--flag``, a
    ``--no-flag``); they are parsed against the field types when applied. ``cfg`` (the config the
    tokens apply to) tells ``--no-<key>`` from a key that starts with ``no_``. A key given twice keeps
    its last value.
    """
    aliases = aliases or {}
    known = set(all_keys(cfg)) if cfg is not None else set()
    nested: dict = {}
    for raw_key, values in split_tokens(tokens):
        key = normalize_key(raw_key)
        key = aliases.get(key, key)
        value: Any = BARE if values is None else values[0] if len(values) == 1 else values
        if key not in known and key.startswith("no_"):
            positive = aliases.get(key[3:], key[3:])
            if positive in known:
                if values is not None:
                    raise ConfigError(f"command line: --{raw_key} takes no value (it sets {positive} to false), "
                                      f"got {' '.join(values)!r}")
                key, value = positive, NEGATED
        parts = key.split(".")
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


# --------------------------------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------------------------------


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The inline documentation of a dataclass's fields: the ``# ...`` comment on the field's line, after
    any full-line comments just above it (base classes first, so a subclass's comment wins). Empty when
    the source cannot be read."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
            tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        except (OSError, TypeError, tokenize.TokenError, IndentationError):
            continue
        trailing = {tok.start[0]: tok.string for tok in tokens if tok.type == tokenize.COMMENT}
        names = {f.name for f in dataclasses.fields(klass)}
        above: list[str] = []
        for lineno, line in enumerate(source.splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("#:").strip())
                continue
            match = re.match(r"    (\w+)\s*:", line)
            if match and match.group(1) in names:
                parts = above + ([trailing[lineno].lstrip("#").strip()] if lineno in trailing else [])
                if parts:
                    comments[match.group(1)] = " ".join(parts)
            above = []
    return comments


def _defaults_of(cfg) -> dict[str, tuple[type, Any]]:
    """``{key: (owner class, default)}`` of the dataclass defaults of ``cfg``'s class, leaves only."""
    try:
        default = type(cfg)()
    except (TypeError, ValueError):
        return {}
    owners = {"": type(default)}
    found = {}
    for path, _, value, nested in iter_fields(default):
        if nested:
            owners[path] = type(value)
        else:
            found[path] = (owners[path.rpartition(".")[0]], value)
    return found


def format_keys(cfg, aliases: Mapping[str, str] | None = None, title: str | None = None) -> str:
    """Every key of ``cfg`` with its type, its value in ``cfg`` (the default when it differs) and its doc.

    For ``--help-keys``: ``cfg`` is the config after the preset, ``--config`` file and overrides given.
    """
    by_key: dict[str, list[str]] = {}
    for alias, key in (aliases or {}).items():
        by_key.setdefault(key, []).append(alias)
    defaults = _defaults_of(cfg)
    lines = [title] if title else []
    owners: dict[str, type] = {}
    for path, hint, value, nested in iter_fields(cfg):
        if nested:
            owners[path] = type(value)
            continue
        parent, _, name = path.rpartition(".")
        owner = owners[parent] if parent else type(cfg)
        shown = f"  --{path} {value!r}"
        default_owner, default = defaults.get(path, (None, None))
        if default_owner is owner and default != value:  # not across a swapped section (another objective)
            shown += f"  (default {default!r})"
        lines.append(shown)
        doc = field_comments(owner).get(name, "")
        alias_text = ", ".join(f"--{a.replace('_', '-')}" for a in by_key.get(path, ()))
        detail = describe_type(hint) + (f"; alias {alias_text}" if alias_text else "")
        lines.append(f"      {detail}" + (f". {doc}" if doc else ""))
    return "\n".join(lines)


def format_exit_codes(exit_codes: Mapping[int, str]) -> str:
    return "exit status:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in sorted(exit_codes.items()))


def format_help(prog: str, config_class: type, description: str | None = None,
                aliases: Mapping[str, str] | None = None, exit_codes: Mapping[int, str] | None = None) -> str:
    """Usage, the description, the keys with their defaults and docs, the aliases and the exit codes."""
    parts = [f"usage: {prog} [--config FILE] [--key value ...] [--help-keys]"]
    if description:
        parts.append(description.strip())
    keys = format_keys(config_class(), aliases) if _constructible(config_class) else ""
    parts.append("keys (--key value; also from --config FILE, YAML or JSON, with the same names):\n" + keys)
    if exit_codes:
        parts.append(format_exit_codes(exit_codes))
    return "\n\n".join(parts)


def _constructible(cls: type) -> bool:
    try:
        cls()
    except (TypeError, ValueError):
        return False
    return True


def emit(text: str) -> None:
    """Print help text; a reader that stops early (``--help-keys | head``) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit


# --------------------------------------------------------------------------------------------------
# Resolving a command's config
# --------------------------------------------------------------------------------------------------


def take_option(args: list[str], flag: str) -> str | None:
    """Remove ``flag VALUE`` / ``flag=VALUE`` from ``args`` and return VALUE (None when absent)."""
    found = None
    i = 0
    while i < len(args):
        name, eq, inline = args[i].partition("=")
        if name != flag:
            i += 1
            continue
        if found is not None:
            raise ConfigError(f"command line: {flag} is given twice")
        if eq:
            found = inline
            del args[i]
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            found = args[i + 1]
            del args[i:i + 2]
        else:
            raise ConfigError(f"command line: {flag} needs a value")
    return found


def resolve(base, config_file: str | None = None, overrides: Sequence[str] = (),
            aliases: Mapping[str, str] | None = None):
    """``base`` (a config instance) with a ``--config`` file, then command-line tokens, applied."""
    cfg = base
    if config_file is not None:
        cfg = apply_updates(cfg, read_config_file(config_file), str(config_file))
    if overrides:
        cfg = apply_updates(cfg, tokens_to_updates(overrides, cfg, aliases), "command line")
    return cfg


def parse_command(argv: Sequence[str] | None, config_class: type, *, prog: str, description: str | None = None,
                  aliases: Mapping[str, str] | None = None, exit_codes: Mapping[int, str] | None = None,
                  bad_config_exit: int = EXIT_BAD_CONFIG):
    """The config of one command from its command line: ``config_class()`` < ``--config FILE`` < ``--key value``.

    ``--help`` prints usage, ``description``, every key with its type, default and inline doc, the aliases
    and ``exit_codes`` (``{status: meaning}``), then exits 0. ``--help-keys`` prints the keys with the values
    this command line resolves to, then exits 0. A refused key or value prints one ``error:`` line on
    stderr (key, expected type, value, origin, close matches) and exits ``bad_config_exit``.

    Args:
        argv: the arguments after the program name (None: ``sys.argv[1:]``).
        config_class: a frozen dataclass whose fields all have defaults; an optional
            ``check_complete(self)`` method holds the checks that need every layer (required keys).
        prog: the command as a user types it, e.g. ``"python -m pvfast.extract"``.
        aliases: extra flag names, ``{"seed": "pairs.seed"}`` (keys with underscores; dashes work too).
    Returns:
        the resolved, checked config.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in HELP_FLAGS for a in args):
        emit(format_help(prog, config_class, description, aliases, exit_codes))
        raise SystemExit(0)
    show_keys = HELP_KEYS_FLAG in args
    args = [a for a in args if a != HELP_KEYS_FLAG]
    try:
        config_file = take_option(args, CONFIG_FLAG)
        cfg = resolve(config_class(), config_file, args, aliases)
        if show_keys:
            emit(format_keys(cfg, aliases, title=f"keys of {prog} (values after defaults < --config < command line):"))
            raise SystemExit(0)
        return check_complete(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        print(f"({prog} --help lists every key)", file=sys.stderr)
        raise SystemExit(bad_config_exit) from None
