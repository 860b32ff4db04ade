"""Per-completion statistics of per-token log-probs: stats[m, :] = Σ_{t in completion m} columns(ℓ_t, w_t, g_t).

The columns and their gradient are the contract of :mod:`pvfast.objectives.stats`; the Triton helpers that
compute them (``accumulate_segment_stats``, ``segment_logp_grad``) are generated from it into
``stats_math.py``. The fused linear kernel calls the same helper right after its vocabulary sweep while
ℓ_t is still in registers; the standalone kernels here call it on ℓ_t read from memory.

Reduction: fp32 atomic adds into the (M, 7) output. A token tile may straddle several completions and a
completion several tiles, so a program cannot own an output row; the atomics make the low bits of the
sums depend on the order the programs finish (a few ulps of fp32, far below the bf16 noise of ℓ_t).

A segment id ≥ M never indexes memory: the token adds NaN to every column of row 0 instead (see
``pvfast.kernels`` for the index checks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pvfast.kernels import check_segment_values
from pvfast.kernels.stats_math import NUM_STATS, accumulate_segment_stats, segment_logp_grad

# One program reduces this many tokens: the kernels are memory-bound and tiny (N ≤ ~64k tokens), so a
# large block keeps the launch to a handful of programs.
SEGMENT_BLOCK = 1024


@triton.jit
def segment_stats_epilogue(Stats_ptr, logp, weight, seg, in_range, num_segments, log_tau):
    # stats[seg_t] += columns(ℓ_t, w_t, g_t) for scored tokens (0 ≤ seg_t < M); a token with seg_t ≥ M
    # poisons row 0 with NaN (when M > 0) instead of writing out of bounds.
    scored = in_range & (seg >= 0) & (seg < num_segments)
    bad = in_range & (seg >= num_segments)
    accumulate_segment_stats(Stats_ptr, logp, weight, seg, scored, log_tau)
    poison = tl.max(bad.to(tl.int32), axis=0) > 0
    if poison & (num_segments > 0):
        for c in tl.static_range(NUM_STATS):
            tl.atomic_add(Stats_ptr + c, float("nan"))


@triton.jit
def _segment_stats_fwd_kernel(Logp_ptr, Weight_ptr, Seg_ptr, Stats_ptr, N, num_segments, log_tau,
                              BLOCK: tl.constexpr):
    # stats[m, :] = Σ_{t: seg_t = m} columns(ℓ_t, w_t, g_t)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < N
    seg = tl.load(Seg_ptr + offs, mask=in_range, other=-1)
    logp = tl.load(Logp_ptr + offs, mask=in_range, other=0.0)
    weight = tl.load(Weight_ptr + offs, mask=in_range, other=0.0)
    segment_stats_epilogue(Stats_ptr, logp, weight, seg, in_range, num_segments, log_tau)


@triton.jit
def _segment_stats_bwd_kernel(Logp_ptr, Weight_ptr, Seg_ptr, GradStats_ptr, GradLogp_ptr, N, num_segments,
                              log_tau, BLOCK: tl.constexpr):
    # dL/dℓ_t = Σ_c G[seg_t, c] · d column_c / dℓ_t  (0 for unscored tokens, NaN for seg_t ≥ M)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < N
    seg = tl.load(Seg_ptr + offs, mask=in_range, other=-1)
    scored = in_range & (seg >= 0) & (seg < num_segments)
    logp = tl.load(Logp_ptr + offs, mask=in_range, other=0.0)
    weight = tl.load(Weight_ptr + offs, mask=in_range, other=0.0)
    grad = segment_logp_grad(GradStats_ptr, logp, weight, seg, scored, log_tau)
    grad = tl.where(seg >= num_segments, float("nan"), grad)
    tl.store(GradLogp_ptr + offs, grad, mask=in_range)


def segment_stats_forward(logp: torch.Tensor, weights: torch.Tensor, segment_ids: torch.Tensor,
                          num_segments: int, log_tau: float) -> torch.Tensor:
    """(N,) ℓ_t fp32, w_t fp32, seg_t int64 (contiguous) → (M, 7) fp32 sums. Segment ids lie in [-1, M)."""
    check_segment_values(segment_ids, num_segments, "segment_stats")
    n = logp.numel()
    stats = torch.zeros(num_segments, NUM_STATS, dtype=torch.float32, device=logp.device)  # atomics add into it
    if n and num_segments:
        _segment_stats_fwd_kernel[(triton.cdiv(n, SEGMENT_BLOCK),)](
            Logp_ptr=logp, Weight_ptr=weights, Seg_ptr=segment_ids, Stats_ptr=stats, N=n,
            num_segments=num_segments, log_tau=float(log_tau), BLOCK=SEGMENT_BLOCK)
    return stats


def segment_stats_backward(logp: torch.Tensor, weights: torch.Tensor, segment_ids: torch.Tensor,
                           grad_stats: torch.Tensor, log_tau: float) -> torch.Tensor:
    """Upstream dL/dstats (M, 7) fp32 contiguous → dL/dℓ (N,) fp32."""
    n = logp.numel()
    grad_logp = torch.empty(n, dtype=torch.float32, device=logp.device)
    if n:
        _segment_stats_bwd_kernel[(triton.cdiv(n, SEGMENT_BLOCK),)](
            Logp_ptr=logp, Weight_ptr=weights, Seg_ptr=segment_ids, GradStats_ptr=grad_stats,
            GradLogp_ptr=grad_logp, N=n, num_segments=grad_stats.shape[0], log_tau=float(log_tau),
            BLOCK=SEGMENT_BLOCK)
    return grad_logp
