"""Build script: package metadata lives in pyproject.toml; this file adds the C++ extension.

The C++ CPU ops in ``csrc/`` are compiled into ``pvfast._C`` with ``torch.utils.cpp_extension``.
Because that needs torch at build time, install with ``pip install --no-build-isolation -e .``
(flash-attention's convention). Set ``PVFAST_SKIP_CPP_BUILD=1`` to skip the build; pvfast then falls
back to the Triton/torch implementations with one warning.
"""

import os
import sys

from setuptools import setup

# One translation unit: CI compiles on two cores and torch/extension.h dominates compile time.
CPP_SOURCES = ["csrc/pvfast_ops.cpp"]
# pvfast_stats.h is generated from pvfast/objectives/stats.py (`python -m pvfast.ops.codegen`).
CPP_HEADERS = ["csrc/pvfast_ops.h", "csrc/pvfast_stats.h"]


def _log(message: str) -> None:
    print(f"pvfast setup.py: {message}", file=sys.stderr)


def cpp_extension_kwargs() -> dict:
    """``ext_modules``/``cmdclass`` for ``setup()``, or nothing when the C++ build is skipped."""
    if os.environ.get("PVFAST_SKIP_CPP_BUILD", "0") == "1":
        _log("PVFAST_SKIP_CPP_BUILD=1: not building the C++ extension pvfast._C")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, library_paths
    except ImportError as exc:
        _log(f"torch is not importable at build time ({exc}); not building pvfast._C. "
             "Install torch first, then `pip install --no-build-isolation -e .` "
             "(an isolated build environment has no torch).")
        return {}
    # -fno-trapping-math (as torch itself builds): lets the vectoriser turn the float clamps of the
    # exp kernel into min/max instead of branches; values are unchanged.
    # Apple clang has no -fopenmp; there the pragmas are ignored and the ops run on one thread.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # rpath to torch's lib folder: `import pvfast._C` works before `import torch`, and libgomp.so.1
    # then resolves to torch's copy as well (one OpenMP runtime in the process).
    linux = sys.platform.startswith("linux")
    rpath = [f"-Wl,-rpath,{path}" for path in library_paths()] if linux else []
    extension = CppExtension(
        name="pvfast._C",
        sources=CPP_SOURCES,
        depends=CPP_HEADERS,
        extra_compile_args=["-O3", "-fno-trapping-math", *openmp],
        extra_link_args=[*openmp, *rpath],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**cpp_extension_kwargs())
