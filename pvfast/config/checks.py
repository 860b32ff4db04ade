"""Field checks of config dataclasses: each failure is a :class:`FieldError` that carries the field's name.

A config section checks its fields in ``__post_init__`` (so a config that exists is valid) with
:func:`require` and :func:`check_choices`. The error says ``<Class>.<field> must ...`` when a section is
built directly in code; the override engine (:mod:`pvfast.config.overrides`) reads the ``field`` attribute
instead and reports the dotted key (``optim.warmup_ratio: must be in [0, 1), got 1.5 (from command line)``).

Torch-free and library-free, like every module of :mod:`pvfast.config`.
"""

from __future__ import annotations

import difflib
import functools
import typing
from typing import Any, Literal, Sequence


class FieldError(ValueError):
    """A field value a config section refuses; ``field`` names it, ``problem`` says why.

    ``str(err)`` is ``"<Class>.<field> <problem>"``, e.g. ``ModelConfig.lora_r must be >= 1, got 0``.
    """

    def __init__(self, owner: str, field: str, problem: str):
        super().__init__(f"{owner}.{field} {problem}")
        self.owner = owner
        self.field = field
        self.problem = problem


def field_error(config, name: str, problem: str) -> FieldError:
    """A :class:`FieldError` for field ``name`` of ``config`` (an instance being checked)."""
    return FieldError(type(config).__name__, name, problem)


def require(config, name: str, ok: bool, expected: str) -> None:
    """Raise ``<Class>.<name> must be <expected>, got <value>`` unless ``ok``."""
    if not ok:
        raise field_error(config, name, f"must be {expected}, got {getattr(config, name)!r}")


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The resolved field annotations of a dataclass (``from __future__ import annotations`` safe)."""
    return typing.get_type_hints(cls)


def require_choice(config, name: str, choices: Sequence[Any], allow_none: bool = False) -> None:
    """Raise ``must be one of 'a', 'b', got 'x'; did you mean 'a'?`` unless the field holds one of ``choices``."""
    value = getattr(config, name)
    if value in choices or (allow_none and value is None):
        return
    problem = f"must be one of {', '.join(repr(c) for c in choices)}{' or None' if allow_none else ''}, got {value!r}"
    close = difflib.get_close_matches(value, [str(c) for c in choices], n=1) if isinstance(value, str) else []
    raise field_error(config, name, problem + (f"; did you mean {close[0]!r}?" if close else ""))


def check_choices(config) -> None:
    """Raise if a Literal-typed field holds a value outside its choices (direct construction included)."""
    for name, hint in type_hints(type(config)).items():
        if typing.get_origin(hint) is Literal:
            require_choice(config, name, typing.get_args(hint))
