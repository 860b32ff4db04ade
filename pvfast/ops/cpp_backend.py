"""Guarded loader of the compiled C++ CPU ops (``pvfast._C``, built from ``csrc/`` by setup.py).

The extension is optional: when it is missing (``PVFAST_SKIP_CPP_BUILD=1``, an install without
``--no-build-isolation``, or a build against another torch) pvfast falls back to its Triton/torch
implementations and says so once per process. ``PVFAST_DISABLE_CPP=1`` switches the extension off
on purpose, silently (e.g. to compare implementations).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

DISABLE_ENV = "PVFAST_DISABLE_CPP"

_NOT_LOADED = object()  # sentinel: no import attempted yet
_module: object = _NOT_LOADED


def _load() -> ModuleType | None:
    try:
        import torch  # noqa: F401  (pvfast._C links against libtorch: load it first)

        from pvfast import _C
    except ImportError as exc:
        warnings.warn(
            f"pvfast: the C++ extension pvfast._C is not available ({exc}); falling back to the "
            "Triton/torch implementations. Build it with `pip install --no-build-isolation -e .` "
            "from the pvfast checkout (torch must already be installed; PVFAST_SKIP_CPP_BUILD "
            f"must not be 1). Set {DISABLE_ENV}=1 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _C


def cpp_ops() -> ModuleType | None:
    """The ``pvfast._C`` module, or None when it is disabled or not built.

    The import is tried once per process; a failure warns once and is remembered.
    """
    global _module
    if os.environ.get(DISABLE_ENV, "0") == "1":
        return None
    if _module is _NOT_LOADED:
        _module = _load()
    return _module  # type: ignore[return-value]


def cpp_available() -> bool:
    """Whether the C++ ops can be used in this process."""
    return cpp_ops() is not None
