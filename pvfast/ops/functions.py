"""One autograd Function per op, over any backend of the protocol in ``pvfast.ops.backend``.

    TokenLogprobs        logits (N, V), targets (N,)                                   → ℓ (N,) fp32
    LinearTokenLogprobs  hidden (N, H), weight (V, H), targets (N,)                    → ℓ (N,) fp32
    SegmentStats         logp (N,), weights (N,), segment_ids (N,)                     → stats (M, 7) fp32
    LinearSegmentStats   hidden, weight, targets, weights, segment_ids                 → stats (M, 7) fp32

Each ``apply`` takes the backend object first, then the tensors, then plain arguments in the protocol's
convention (``ignore_index``, ``softcap`` with 0.0 = off, ``log_tau``). Inputs are expected checked and
normalised (``pvfast.ops.dispatch`` does it).

Gradient in the forward: with ``grad_in_forward`` (hidden needs a gradient and the weight is frozen, the
LoRA/QLoRA case) the linear forward also computes dℓ/dhidden (N, H) fp32 and saves only that; the backward
is then a per-row scaling, with no logits recomputation and no weight-gradient work. Otherwise the
forward saves hidden, weight, targets and lse, and the backward recomputes the logits.
"""

from __future__ import annotations

import torch


def _grad_logp(grad: torch.Tensor) -> torch.Tensor:
    return grad.float().contiguous()


class TokenLogprobs(torch.autograd.Function):
    """logits (N, V), targets (N,) → ℓ (N,) fp32; saves lse (N,), the backward recomputes the softmax."""

    @staticmethod
    def forward(ctx, backend, logits, targets, ignore_index: int):
        logp, lse = backend.token_logprobs_fwd(logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.backend, ctx.ignore_index = backend, ignore_index
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, targets, lse = ctx.saved_tensors
        grad_logits = ctx.backend.token_logprobs_bwd(logits, targets, lse, _grad_logp(grad_logp), ctx.ignore_index)
        return None, grad_logits, None, None


def _save_linear(ctx, backend, hidden, weight, targets, lse, direction, ignore_index, softcap) -> tuple:
    """What the linear backward needs: the direction alone (gradient in forward), else the inputs and lse."""
    ctx.backend, ctx.ignore_index, ctx.softcap = backend, ignore_index, softcap
    ctx.hidden_dtype = hidden.dtype
    ctx.grad_in_forward = direction is not None
    return (direction,) if direction is not None else (hidden, weight, targets, lse)


def _linear_backward(ctx, grad_logp, saved, weight_input_index: int):
    """(grad_hidden, grad_weight) from dL/dℓ (N,)."""
    if ctx.grad_in_forward:
        (direction,) = saved
        return (grad_logp.float()[:, None] * direction).to(ctx.hidden_dtype), None
    hidden, weight, targets, lse = saved
    need_weight_grad = ctx.needs_input_grad[weight_input_index]
    grad_hidden, grad_weight = ctx.backend.linear_token_logprobs_bwd(
        hidden, weight, targets, lse, _grad_logp(grad_logp), ctx.ignore_index, ctx.softcap, need_weight_grad)
    return grad_hidden, (grad_weight if need_weight_grad else None)


class LinearTokenLogprobs(torch.autograd.Function):
    """hidden (N, H), weight (V, H), targets (N,) → ℓ (N,) fp32 of logits hidden·weightᵀ (soft-capped if asked).

    With ``grad_in_forward`` the forward computes dℓ/dhidden and the backward only scales it; otherwise the
    backward recomputes the logits (and the weight gradient only if the weight requires grad).
    """

    @staticmethod
    def forward(ctx, backend, hidden, weight, targets, ignore_index: int, softcap: float, grad_in_forward: bool):
        if grad_in_forward:
            logp, lse, direction = backend.linear_token_logprobs_fwd_with_grad(hidden, weight, targets,
                                                                               ignore_index, softcap)
        else:
            (logp, lse), direction = backend.linear_token_logprobs_fwd(hidden, weight, targets, ignore_index,
                                                                       softcap), None
        ctx.save_for_backward(*_save_linear(ctx, backend, hidden, weight, targets, lse, direction, ignore_index,
                                            softcap))
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        grad_hidden, grad_weight = _linear_backward(ctx, grad_logp, ctx.saved_tensors, weight_input_index=2)
        return None, grad_hidden, grad_weight, None, None, None, None


class SegmentStats(torch.autograd.Function):
    """logp (N,), weights (N,), segment_ids (N,) → stats (M, 7) fp32; the backward is a gather."""

    @staticmethod
    def forward(ctx, backend, logp, weights, segment_ids, num_segments: int, log_tau: float):
        stats = backend.segment_stats_fwd(logp, weights, segment_ids, num_segments, log_tau)
        ctx.save_for_backward(logp, weights, segment_ids)
        ctx.backend, ctx.log_tau = backend, log_tau
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        logp, weights, segment_ids = ctx.saved_tensors
        grad_logp = ctx.backend.segment_stats_bwd(logp, weights, segment_ids, grad_stats.float().contiguous(),
                                                  ctx.log_tau)
        return None, grad_logp.to(logp.dtype), None, None, None, None


class LinearSegmentStats(torch.autograd.Function):
    """hidden (N, H), weight (V, H), targets, weights, segment_ids (N,) → stats (M, 7) fp32.

    Forward: the backend's fused ``linear_segment_stats_fwd`` where it has one (statistics reduced inside the
    linear kernel), else the linear forward then ``segment_stats_fwd``. Backward: the statistics gather,
    then the linear backward (with ``grad_in_forward``, a scaling of the dℓ/dhidden of the forward).
    """

    @staticmethod
    def forward(ctx, backend, hidden, weight, targets, weights, segment_ids, num_segments: int, log_tau: float,
                ignore_index: int, softcap: float, grad_in_forward: bool):
        fused = getattr(backend, "linear_segment_stats_fwd", None)
        if fused is not None:
            logp, lse, stats, direction = fused(hidden, weight, targets, weights, segment_ids, num_segments,
                                                log_tau, ignore_index, softcap, grad_in_forward)
        else:
            if grad_in_forward:
                logp, lse, direction = backend.linear_token_logprobs_fwd_with_grad(hidden, weight, targets,
                                                                                   ignore_index, softcap)
            else:
                (logp, lse), direction = backend.linear_token_logprobs_fwd(hidden, weight, targets, ignore_index,
                                                                           softcap), None
            stats = backend.segment_stats_fwd(logp, weights, segment_ids, num_segments, log_tau)
        saved = _save_linear(ctx, backend, hidden, weight, targets, lse, direction, ignore_index, softcap)
        ctx.num_linear_saved = len(saved)
        ctx.save_for_backward(*saved, logp, weights, segment_ids)
        ctx.log_tau = log_tau
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        saved = ctx.saved_tensors
        logp, weights, segment_ids = saved[ctx.num_linear_saved:]
        grad_logp = ctx.backend.segment_stats_bwd(logp, weights, segment_ids, grad_stats.float().contiguous(),
                                                  ctx.log_tau)
        grad_hidden, grad_weight = _linear_backward(ctx, grad_logp, saved[:ctx.num_linear_saved],
                                                    weight_input_index=2)
        return None, grad_hidden, grad_weight, None, None, None, None, None, None, None, None
