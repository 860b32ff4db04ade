"""The compute precision of a run's forward passes: one switch, the same for every pass of a step.

The reference pass and the policy pass of a step must run under the same precision: with a fresh LoRA
(B = 0) the policy *is* the reference, so their statistics, and hence the margin h, are then equal to the
bit at step 0. ``auto`` is bf16 autocast on CUDA (the published recipe's bf16 compute) and full precision
on the CPU (bitwise-reproducible runs); ``bf16`` forces autocast on any device (also the CPU, where it is
how the precision path is tested), ``off`` forces the weights' own dtype.
"""

from __future__ import annotations

import contextlib

import torch

from pvfast.config.sections import AUTOCAST_MODES


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``mode`` on ``device``, or None for full precision."""
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"autocast must be one of {AUTOCAST_MODES}, got {mode!r}")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """A context manager running the forward passes under ``mode`` (see the module docstring)."""
    dtype = autocast_dtype(mode, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
