"""Shared by the op tests: float64 references, input builders and the tolerance rules (not a test module).

Tolerances: fp32 results use the absolute table TOL. For fp16/bf16 inputs, and wherever an fp32 result is
compared over a large reduction (V > 65,536), the check is relative to torch itself: our max error against
the float64 reference must be ≤ 2 × the error of torch's own same-dtype computation + atol + rtol·max|ref|
(the CCE/Liger convention), so it holds on any CPU's BLAS.
"""

from __future__ import annotations

import math

import pytest
import torch

from pvfast.objectives.stats import IGNORE_INDEX, NUM_STATS

IGNORE = IGNORE_INDEX
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (atol, rtol): absolute checks for fp32, the "+ tol" part of the torch-relative check otherwise.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (4e-3, 4e-3)}


def reference_logprobs(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """ℓ (N,) by log_softmax in the dtype of ``logits`` (soft-capped first if asked); 0 where ignored."""
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    active = targets != IGNORE
    picked = torch.log_softmax(logits, dim=-1).gather(1, torch.where(active, targets, 0)[:, None]).squeeze(1)
    return torch.where(active, picked, torch.zeros_like(picked))


def random_targets(n: int, v: int, gen: torch.Generator, ignore_every: int = 5) -> torch.Tensor:
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::ignore_every] = IGNORE
    targets[-1] = v - 1  # the last vocabulary column sits in a partial tile
    return targets


def random_upstream(n: int, gen: torch.Generator) -> torch.Tensor:
    """Upstream dL/dℓ: float64, mixed magnitudes, never all ones, never zero."""
    return torch.rand(n, generator=gen, dtype=torch.float64) * 2 + 0.25


def linear_inputs(n, v, h, dtype, seed, scale: float = 1.0):
    """hidden (N, H), weight (V, H) in ``dtype``, targets (N,) with ignored rows, upstream (N,) float64."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=gen) / h ** 0.25).to(dtype)
    weight = (torch.randn(v, h, generator=gen) / h ** 0.25 * scale).to(dtype)
    return hidden, weight, random_targets(n, v, gen), random_upstream(n, gen)


def segment_inputs(n: int, m: int, gen: torch.Generator):
    """weights (N,) float64, segment ids in [-1, m-1) (segment m-1 stays empty), grad_stats (m, 7) float64."""
    weights = torch.rand(n, generator=gen, dtype=torch.float64) * 1.5 + 0.1
    segment_ids = torch.randint(-1, m - 1, (n,), generator=gen)
    grad_stats = torch.randn(m, NUM_STATS, generator=gen, dtype=torch.float64)
    return weights, segment_ids, grad_stats


def max_error(ours: torch.Tensor, ref64: torch.Tensor) -> float:
    return (ours.double() - ref64).abs().max().item() if ours.numel() else 0.0


def assert_close_to_fp64(ours: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor | None,
                         dtype: torch.dtype, what: str) -> None:
    """The rule of the module docstring: absolute for fp32 (or without a torch result), else torch-relative."""
    atol, rtol = TOL[dtype]
    assert torch.isfinite(ours).all(), f"{what}: non-finite values (unwritten output?)"
    err = max_error(ours, ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    bound = atol + rtol * scale
    if dtype != torch.float32 and torch_same_dtype is not None:
        bound += 2 * max_error(torch_same_dtype, ref64)
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} ({dtype})"


def assert_within_torch_error(ours: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor,
                              what: str, atol: float = 1e-6, rtol: float = 1e-6) -> None:
    """err(ours) ≤ 2·err(torch, same dtype) + atol + rtol·max|ref|, all against the float64 reference."""
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    err, torch_err = max_error(ours, ref64), max_error(torch_same_dtype, ref64)
    bound = 2 * torch_err + atol + rtol * (ref64.abs().max().item() if ref64.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (torch's own error {torch_err:.3g})"


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every torch.empty / empty_like the launchers allocate starts as NaN (ints as -7): unwritten outputs fail."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out.fill_(-7)

    def empty_like(*args, **kwargs):
        out = real_empty_like(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out.fill_(-7)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
