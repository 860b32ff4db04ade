"""Per-completion statistics from per-token log-probs (the fused epilogue), forward and backward.

The sums follow the contract of :mod:`pvfast.objectives.stats` (columns in ``STAT_FIELDS`` order), and
``pvfast.objectives.stats.segment_stats_reference`` is the oracle. The epilogue is a ``@triton.jit`` helper,
:func:`_accumulate_segment_stats`, so the fused linear kernel (``linear_token_logprobs.py``) calls it
right after its vocabulary sweep while ℓ_t is still in registers; the standalone kernel here calls the
same helper on ℓ_t read from memory.

Reduction: fp32 atomic adds into the (M, 7) output. A token tile may straddle several completions and a
completion several tiles, so a program cannot own an output row; the atomics make the low bits of the
sums depend on the order the programs finish (a few ulps of fp32, far below the bf16 noise of ℓ_t).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pvfast.objectives.stats import NUM_STATS
from pvfast.objectives.config import log_tau as _log_tau

# One program reduces this many tokens: the kernels are memory-bound and tiny (N ≤ ~64k tokens), so a
# large block keeps the launch to a handful of programs.
SEGMENT_BLOCK = 1024


@triton.jit
def _accumulate_segment_stats(Stats_ptr, logp, weight, seg, scored, log_tau, NUM_COLS: tl.constexpr):
    # For each scored token t (seg_t >= 0), with g_t = 1[ℓ_t < log τ]:
    #   stats[seg_t] += (ℓ_t, w_t ℓ_t, w_t, 1, w_t g_t (−ℓ_t), w_t g_t, g_t)
    gate = tl.where(logp < log_tau, 1.0, 0.0)
    row = Stats_ptr + tl.where(scored, seg, 0) * NUM_COLS
    tl.atomic_add(row + 0, logp, mask=scored)
    tl.atomic_add(row + 1, weight * logp, mask=scored)
    tl.atomic_add(row + 2, weight, mask=scored)
    tl.atomic_add(row + 3, tl.where(scored, 1.0, 0.0), mask=scored)
    tl.atomic_add(row + 4, -(weight * gate * logp), mask=scored)
    tl.atomic_add(row + 5, weight * gate, mask=scored)
    tl.atomic_add(row + 6, gate, mask=scored)


@triton.jit
def _segment_stats_fwd_kernel(Logp_ptr, Weight_ptr, Seg_ptr, Stats_ptr, N, log_tau,
                               NUM_COLS: tl.constexpr, BLOCK: tl.constexpr):
    # stats[m, :] = Σ_{t: seg_t = m} (ℓ_t, w_t ℓ_t, w_t, 1, −w_t g_t ℓ_t, w_t g_t, g_t)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < N
    seg = tl.load(Seg_ptr + offs, mask=in_range, other=-1)
    logp = tl.load(Logp_ptr + offs, mask=in_range, other=0.0)
    weight = tl.load(Weight_ptr + offs, mask=in_range, other=0.0)
    _accumulate_segment_stats(Stats_ptr, logp, weight, seg, seg >= 0, log_tau, NUM_COLS)


@triton.jit
def _segment_stats_bwd_kernel(Logp_ptr, Weight_ptr, Seg_ptr, GradStats_ptr, GradLogp_ptr, N, log_tau,
                               NUM_COLS: tl.constexpr, BLOCK: tl.constexpr):
    # Only columns 0, 1 and 4 depend on ℓ_t (the gate carries no gradient), so for m = seg_t:
    #   dL/dℓ_t = G[m, 0] + w_t G[m, 1] − w_t g_t G[m, 4]      (0 for unscored tokens)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < N
    seg = tl.load(Seg_ptr + offs, mask=in_range, other=-1)
    scored = seg >= 0
    logp = tl.load(Logp_ptr + offs, mask=in_range, other=0.0)
    weight = tl.load(Weight_ptr + offs, mask=in_range, other=0.0)
    row = GradStats_ptr + tl.where(scored, seg, 0) * NUM_COLS
    g_sum = tl.load(row + 0, mask=scored, other=0.0)
    g_wsum = tl.load(row + 1, mask=scored, other=0.0)
    g_gated = tl.load(row + 4, mask=scored, other=0.0)
    gate = tl.where(logp < log_tau, 1.0, 0.0)
    grad = tl.where(scored, g_sum + weight * g_wsum - weight * gate * g_gated, 0.0)
    tl.store(GradLogp_ptr + offs, grad, mask=in_range)


def check_segment_vectors(num_tokens: int, device: torch.device, weights: torch.Tensor,
                          segment_ids: torch.Tensor, num_segments: int, op: str) -> None:
    """Checks on the per-token weights and segment ids shared by the standalone and fused ops."""
    if weights.shape != (num_tokens,) or segment_ids.shape != (num_tokens,):
        raise ValueError(f"{op}: weights and segment_ids must be ({num_tokens},), got "
                         f"{tuple(weights.shape)} and {tuple(segment_ids.shape)}")
    if weights.device != device or segment_ids.device != device:
        raise ValueError(f"{op}: weights on {weights.device} and segment_ids on {segment_ids.device}, "
                         f"expected {device}")
    if not weights.is_floating_point():
        raise TypeError(f"{op}: weights must be floating point, got {weights.dtype}")
    if segment_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: segment_ids must be int32 or int64, got {segment_ids.dtype}")
    if num_segments < 0:
        raise ValueError(f"{op}: num_segments must be >= 0, got {num_segments}")


def check_segment_inputs(logp: torch.Tensor, weights: torch.Tensor, segment_ids: torch.Tensor,
                         num_segments: int) -> None:
    """Shape/dtype/device checks of the standalone segment statistics."""
    if logp.dim() != 1 or not logp.is_floating_point():
        raise ValueError(f"segment_stats: logp must be a 1-D float tensor, got {logp.dtype} "
                         f"of shape {tuple(logp.shape)}")
    check_segment_vectors(logp.shape[0], logp.device, weights, segment_ids, num_segments, "segment_stats")


def segment_stats_forward(logp: torch.Tensor, weights: torch.Tensor, segment_ids: torch.Tensor,
                           num_segments: int, log_tau: float) -> torch.Tensor:
    """(N,) ℓ_t, w_t, seg_t → (M, 7) fp32 sums. Segment ids must lie in [-1, M)."""
    check_segment_inputs(logp, weights, segment_ids, num_segments)
    logp = logp.float().contiguous()
    weights = weights.float().contiguous()
    segment_ids = segment_ids.long().contiguous()
    n = logp.numel()
    stats = torch.zeros(num_segments, NUM_STATS, dtype=torch.float32, device=logp.device)  # atomics add into it
    if n and num_segments:
        _segment_stats_fwd_kernel[(triton.cdiv(n, SEGMENT_BLOCK),)](
            Logp_ptr=logp, Weight_ptr=weights, Seg_ptr=segment_ids, Stats_ptr=stats, N=n,
            log_tau=float(log_tau), NUM_COLS=NUM_STATS, BLOCK=SEGMENT_BLOCK)
    return stats


def segment_stats_backward(logp: torch.Tensor, weights: torch.Tensor, segment_ids: torch.Tensor,
                            grad_stats: torch.Tensor, log_tau: float) -> torch.Tensor:
    """Upstream dL/dstats (M, 7) → dL/dℓ (N,) fp32."""
    logp = logp.float().contiguous()
    weights = weights.float().contiguous()
    segment_ids = segment_ids.long().contiguous()
    grad_stats = grad_stats.float().contiguous()
    n = logp.numel()
    grad_logp = torch.empty(n, dtype=torch.float32, device=logp.device)
    if n:
        _segment_stats_bwd_kernel[(triton.cdiv(n, SEGMENT_BLOCK),)](
            Logp_ptr=logp, Weight_ptr=weights, Seg_ptr=segment_ids, GradStats_ptr=grad_stats,
            GradLogp_ptr=grad_logp, N=n, log_tau=float(log_tau), NUM_COLS=NUM_STATS, BLOCK=SEGMENT_BLOCK)
    return grad_logp


class SegmentStatsFunction(torch.autograd.Function):
    """stats (M, 7) fp32 = segment sums of logp (N,) with weights (N,) and segment_ids (N,).

    The backward is a gather (no recomputation): dL/dℓ_t from the three differentiable columns.
    Only ``logp`` receives a gradient (weights and the gate are data).
    """

    @staticmethod
    def forward(ctx, logp, weights, segment_ids, num_segments: int, tau: float):
        lt = _log_tau(tau)
        stats = segment_stats_forward(logp, weights, segment_ids, num_segments, lt)
        ctx.save_for_backward(logp, weights, segment_ids)
        ctx.log_tau = lt
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        logp, weights, segment_ids = ctx.saved_tensors
        grad_logp = segment_stats_backward(logp, weights, segment_ids, grad_stats, ctx.log_tau)
        return grad_logp.to(logp.dtype), None, None, None, None
