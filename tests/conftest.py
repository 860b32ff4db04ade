"""Test-suite setup: runs without a GPU; Triton kernels go through the interpreter on the CPU.

(The `gpu` marker's skip lives in the repository's root conftest.py, shared with bench/.)
"""

import os

import torch

# Must be set before any Triton kernel is decorated (triton reads it in @triton.jit).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
