"""Triton kernels, installed as ``pvfast.kernels`` (never as a top-level ``kernels`` package).

Modules: ``token_logprobs`` (log-probs from materialised logits), ``linear_token_logprobs`` (the fused
lm-head op: logits never stored), ``segment_stats`` (per-completion statistics), ``stats_math`` (the
statistics contract as Triton helpers, generated from ``pvfast.objectives.stats``). The autograd Functions
live in ``pvfast.ops.functions`` and reach these launchers through ``pvfast.ops.triton_backend``.

Out-of-range indices (a target outside [0, V) that is not ignore_index, a segment id ≥ M):
  * always, with no host synchronisation: the kernels never read or write outside their buffers for such
    an index, and they poison the result instead of computing a wrong number silently: ℓ and lse of a
    bad target are NaN (and its dℓ/dhidden row), a bad segment id adds NaN to every column of stats row 0.
    A NaN loss stops the trainer (its NaN check), so a bad batch cannot train silently.
  * ``PVFAST_CHECK_INDICES`` selects a host-side check that raises a ValueError naming the argument and
    the first bad value before any launch: ``auto`` (default) checks when the tensors are on the CPU (the
    interpreter: no device to synchronise) and skips the check on CUDA, ``1`` checks on CUDA too (one
    host sync per call: a debugging switch), ``0`` never checks.
"""

from __future__ import annotations

import os

import torch

CHECK_INDICES_ENV = "PVFAST_CHECK_INDICES"


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``).

    The interpreter cannot run bf16/fp16 ``tl.dot`` correctly, so launchers pass an upcast flag then.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _single_threaded_numpy_blas() -> None:
    """Under the interpreter every tl.dot is a small numpy matmul; numpy's multi-threaded OpenBLAS hands each one
    to its threads, which on a busy CPU makes them ~100× slower (measured: 160 dots of a 600-token op, 10 s vs
    0.08 s). Set numpy's OpenBLAS (not torch's BLAS) to one thread — only when TRITON_INTERPRET=1."""
    import ctypes

    import numpy  # noqa: F401  (loads its OpenBLAS)

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and line.split()[-1][:1] == "/"}
    except OSError:
        return
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(1)
                break


if interpreting():
    _single_threaded_numpy_blas()


def index_checks_enabled(device: torch.device) -> bool:
    """Whether the launchers check index values on the host (see the module docstring)."""
    mode = os.environ.get(CHECK_INDICES_ENV, "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"{CHECK_INDICES_ENV} must be auto, 0 or 1, got {mode!r}")
    if device.type == "meta" or mode == "0":
        return False
    return mode == "1" or device.type == "cpu"


def check_target_values(targets: torch.Tensor, vocab: int, ignore_index: int, op: str) -> None:
    """Refuse a target outside [0, vocab) that is not ignore_index (when index checks are enabled)."""
    if not targets.numel() or not index_checks_enabled(targets.device):
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"targets[{first}] = {int(targets[first])}")


def check_segment_values(segment_ids: torch.Tensor, num_segments: int, op: str) -> None:
    """Refuse a segment id ≥ num_segments (negative ids mean unscored) when index checks are enabled."""
    if not segment_ids.numel() or not index_checks_enabled(segment_ids.device):
        return
    bad = segment_ids >= num_segments
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: segment_ids must be < num_segments={num_segments} (or negative for unscored "
                         f"tokens); segment_ids[{first}] = {int(segment_ids[first])}")
