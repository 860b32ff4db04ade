"""Test-suite setup: runs without a GPU; Triton kernels go through the interpreter on the CPU."""

import os

import torch

# Must be set before any Triton kernel is decorated (triton reads it in @triton.jit).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
