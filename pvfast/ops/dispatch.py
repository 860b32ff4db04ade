"""Public differentiable ops: per-token log-probs and per-completion statistics, with a choice of backend.

    token_logprobs(logits (N,V), targets (N,))                                   -> ℓ (N,) fp32
    linear_token_logprobs(hidden (N,H), weight (V,H), targets (N,))              -> ℓ (N,) fp32
    segment_stats(logp (N,), weights (N,), segment_ids (N,), M, tau)            -> stats (M,7) fp32
    linear_segment_stats(hidden, weight, targets, weights, segment_ids, M, tau) -> stats (M,7) fp32

ℓ_t = log softmax(logits_t)[y_t], 0 for targets equal to ``ignore_index``; the stats columns are those
of :mod:`pvfast.objectives.stats` (tokens with segment id −1 are not scored; a scored token whose target is ignored
counts with ℓ = 0, so give such tokens segment id −1).

``impl`` picks the backend:
  * ``"triton"``: the kernels in ``pvfast.kernels`` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
    ``linear_segment_stats`` reduces the stats inside the linear kernel (fused epilogue).
  * ``"cpp"``: the compiled CPU extension ``pvfast._C`` (loaded by ``pvfast.ops.cpp_backend``).
  * ``"torch"``: the chunked PyTorch reference below (works everywhere; memory bounded by the chunk).
  * ``"auto"``: CUDA → triton; CPU → cpp if built, else triton under the interpreter, else torch.
"""

from __future__ import annotations

import torch

from pvfast.kernels import interpreting
from pvfast.kernels.linear_token_logprobs import (
    LinearSegmentStatsFunction,
    LinearTokenLogprobsFunction,
    check_linear_inputs,
)
from pvfast.kernels.segment_stats import SegmentStatsFunction, check_segment_inputs, check_segment_vectors
from pvfast.kernels.token_logprobs import TokenLogprobsFunction, check_logits_targets
from pvfast.objectives.config import log_tau
from pvfast.objectives.stats import NUM_STATS

IMPLS = ("auto", "triton", "cpp", "torch")
IGNORE_INDEX = -100
# Tokens per chunk of the torch reference: bounds its temporaries to TORCH_CHUNK_TOKENS × V fp32
# (1024 × 150k ≈ 600 MB) instead of N × V.
TORCH_CHUNK_TOKENS = 1024


# ----------------------------------------------------------------------------------------------------
# Torch reference backend: same function names and signatures as the C++ extension (pvfast._C).
# ----------------------------------------------------------------------------------------------------
class TorchBackend:
    """Chunked PyTorch implementation of the seven backend functions, fp32 math on any device.

    Memory: one TORCH_CHUNK_TOKENS × V fp32 logits chunk at a time, plus an fp32 copy of a bf16/fp16
    weight (V × H) for the duration of a call.
    """

    @staticmethod
    def _chunks(n: int):
        return [slice(i, min(i + TORCH_CHUNK_TOKENS, n)) for i in range(0, n, TORCH_CHUNK_TOKENS)]

    @staticmethod
    def _logp_lse(z: torch.Tensor, targets: torch.Tensor, ignore_index: int):
        """fp32 logits chunk (n, V) → (ℓ, lse), both 0 on ignored rows."""
        active = targets != ignore_index
        lse = torch.logsumexp(z, dim=-1)
        picked = z.gather(1, torch.where(active, targets, 0).long()[:, None]).squeeze(1)
        return torch.where(active, picked - lse, 0.0), torch.where(active, lse, 0.0)

    @staticmethod
    def _dlogits(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor,
                 ignore_index: int) -> torch.Tensor:
        """dL/dz = g·(onehot(y) − softmax(z)) for an fp32 chunk; zero rows for ignored targets."""
        active = targets != ignore_index
        grad = torch.where(active, grad_logp.float(), 0.0)
        dz = -grad[:, None] * torch.exp(z - lse[:, None])
        dz.scatter_add_(1, torch.where(active, targets, 0).long()[:, None], grad[:, None])
        return dz

    @staticmethod
    def token_logprobs_fwd(logits, targets, ignore_index: int):
        n = logits.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        for c in TorchBackend._chunks(n):
            logp[c], lse[c] = TorchBackend._logp_lse(logits[c].float(), targets[c], ignore_index)
        return logp, lse

    @staticmethod
    def token_logprobs_bwd(logits, targets, lse, grad_logp, ignore_index: int):
        grad_logits = torch.empty_like(logits)
        for c in TorchBackend._chunks(logits.shape[0]):
            grad_logits[c] = TorchBackend._dlogits(logits[c].float(), targets[c], lse[c], grad_logp[c],
                                                   ignore_index)
        return grad_logits

    @staticmethod
    def linear_token_logprobs_fwd(hidden, weight, targets, ignore_index: int):
        n = hidden.shape[0]
        weight32 = weight.float()
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        for c in TorchBackend._chunks(n):
            z = hidden[c].float() @ weight32.T
            logp[c], lse[c] = TorchBackend._logp_lse(z, targets[c], ignore_index)
        return logp, lse

    @staticmethod
    def linear_token_logprobs_fwd_with_grad(hidden, weight, targets, ignore_index: int):
        """(ℓ, lse, direction (N, H) fp32 = dℓ_t/dh_t = W[y_t] − softmax(z_t)·W); zero rows where ignored."""
        n = hidden.shape[0]
        weight32 = weight.float()
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        direction = torch.empty(n, weight.shape[1], dtype=torch.float32, device=hidden.device)
        for c in TorchBackend._chunks(n):
            z = hidden[c].float() @ weight32.T
            logp[c], lse[c] = TorchBackend._logp_lse(z, targets[c], ignore_index)
            # g = 1 gives dℓ/dz; a zero row for ignored targets
            dz = TorchBackend._dlogits(z, targets[c], lse[c], torch.ones_like(lse[c]), ignore_index)
            direction[c] = dz @ weight32
        return logp, lse, direction

    @staticmethod
    def linear_token_logprobs_bwd(hidden, weight, targets, lse, grad_logp, ignore_index: int,
                                  need_weight_grad: bool):
        weight32 = weight.float()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight32) if need_weight_grad else None
        for c in TorchBackend._chunks(hidden.shape[0]):
            h32 = hidden[c].float()
            dz = TorchBackend._dlogits(h32 @ weight32.T, targets[c], lse[c], grad_logp[c], ignore_index)
            grad_hidden[c] = dz @ weight32
            if need_weight_grad:
                grad_weight += dz.T @ h32
        grad_weight = (grad_weight.to(weight.dtype) if need_weight_grad
                       else torch.empty(0, dtype=weight.dtype, device=weight.device))
        return grad_hidden, grad_weight

    @staticmethod
    def segment_stats_fwd(logp, weights, segment_ids, num_segments: int, log_tau: float):
        # Same layout as pvfast.objectives.stats.segment_stats_reference, gated on log τ directly.
        seg = segment_ids.long()
        scored = seg >= 0
        lp, w = logp.float()[scored], weights.float()[scored]
        gate = (lp < log_tau).float()
        cols = torch.stack([lp, w * lp, w, torch.ones_like(lp), -(w * gate * lp), w * gate, gate], dim=1)
        stats = torch.zeros(num_segments, NUM_STATS, dtype=torch.float32, device=logp.device)
        return stats.index_add_(0, seg[scored], cols)

    @staticmethod
    def segment_stats_bwd(logp, weights, segment_ids, grad_stats, log_tau: float):
        seg = segment_ids.long()
        scored = seg >= 0
        rows = grad_stats.float()[seg.clamp(min=0)]
        w = weights.float()
        gate = (logp.float() < log_tau).float()
        grad = rows[:, 0] + w * rows[:, 1] - w * gate * rows[:, 4]
        return torch.where(scored, grad, 0.0)


# ----------------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------------
def _cpp_module():
    """The compiled extension, or None (pvfast.ops.cpp_backend warns once when it cannot be loaded)."""
    try:
        from pvfast.ops.cpp_backend import cpp_ops
    except ModuleNotFoundError as err:
        if err.name != "pvfast.ops.cpp_backend":
            raise
        return None
    return cpp_ops()


def _resolve_impl(impl: str, device: torch.device, op: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and _cpp_module() is not None:
            return "cpp"
        return "triton" if interpreting() else "torch"
    if impl == "triton" and device.type != "cuda" and not interpreting():
        raise RuntimeError(f"{op}: impl='triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 "
                           f"set before triton is imported")
    if impl == "cpp" and _cpp_module() is None:
        raise RuntimeError(f"{op}: impl='cpp' but the C++ extension pvfast._C is not available (not built, "
                           f"or switched off by PVFAST_DISABLE_CPP=1; build it with "
                           f"`pip install --no-build-isolation -e .`)")
    return impl


def _backend(impl: str):
    return _cpp_module() if impl == "cpp" else TorchBackend


# ----------------------------------------------------------------------------------------------------
# Autograd functions over a backend (cpp or torch); the Triton ones live beside their kernels.
# ----------------------------------------------------------------------------------------------------
class _BackendTokenLogprobs(torch.autograd.Function):
    """logits (N, V), targets (N,) → ℓ (N,) fp32; saves lse (N,), the backward recomputes softmax."""

    @staticmethod
    def forward(ctx, backend, logits, targets, ignore_index: int):
        logp, lse = backend.token_logprobs_fwd(logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.backend, ctx.ignore_index = backend, ignore_index
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, targets, lse = ctx.saved_tensors
        grad_logits = ctx.backend.token_logprobs_bwd(logits, targets, lse, grad_logp.float().contiguous(),
                                                     ctx.ignore_index)
        return None, grad_logits, None, None


def _linear_forward(ctx, backend, hidden, weight, targets, ignore_index: int, grad_in_forward: bool):
    """Log-probs (N,) and lse (N,); saves what _linear_backward needs as ctx.linear_saved.

    grad_in_forward (hidden needs a gradient, weight frozen): the forward also returns dℓ/dh (N, H) fp32 and
    only that is saved; otherwise hidden, weight, targets and lse are saved and the backward recomputes.
    """
    ctx.backend, ctx.ignore_index, ctx.grad_in_forward = backend, ignore_index, grad_in_forward
    ctx.hidden_dtype = hidden.dtype
    if grad_in_forward:
        logp, lse, direction = backend.linear_token_logprobs_fwd_with_grad(hidden, weight, targets, ignore_index)
        return logp, lse, (direction,)
    logp, lse = backend.linear_token_logprobs_fwd(hidden, weight, targets, ignore_index)
    return logp, lse, (hidden, weight, targets, lse)


def _linear_backward(ctx, grad_logp, saved):
    if ctx.grad_in_forward:
        (direction,) = saved
        return (grad_logp.float()[:, None] * direction).to(ctx.hidden_dtype), None
    hidden, weight, targets, lse = saved
    need_weight_grad = ctx.needs_input_grad[2]
    grad_hidden, grad_weight = ctx.backend.linear_token_logprobs_bwd(
        hidden, weight, targets, lse, grad_logp.float().contiguous(), ctx.ignore_index, need_weight_grad)
    return grad_hidden, (grad_weight if need_weight_grad else None)


class _BackendLinearTokenLogprobs(torch.autograd.Function):
    """hidden (N, H), weight (V, H), targets (N,) → ℓ (N,) fp32.

    With grad_in_forward the forward computes dℓ/dhidden (frozen weight) and the backward only scales it;
    otherwise the backward recomputes the logits.
    """

    @staticmethod
    def forward(ctx, backend, hidden, weight, targets, ignore_index: int, grad_in_forward: bool):
        logp, _, saved = _linear_forward(ctx, backend, hidden, weight, targets, ignore_index, grad_in_forward)
        ctx.save_for_backward(*saved)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        grad_hidden, grad_weight = _linear_backward(ctx, grad_logp, ctx.saved_tensors)
        return None, grad_hidden, grad_weight, None, None, None


class _BackendSegmentStats(torch.autograd.Function):
    """logp (N,), weights (N,), segment_ids (N,) → stats (M, 7) fp32; backward is a gather."""

    @staticmethod
    def forward(ctx, backend, logp, weights, segment_ids, num_segments: int, log_tau_value: float):
        stats = backend.segment_stats_fwd(logp, weights, segment_ids, num_segments, log_tau_value)
        ctx.save_for_backward(logp, weights, segment_ids)
        ctx.backend, ctx.log_tau = backend, log_tau_value
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        logp, weights, segment_ids = ctx.saved_tensors
        grad_logp = ctx.backend.segment_stats_bwd(logp, weights, segment_ids, grad_stats.float().contiguous(),
                                                  ctx.log_tau)
        return None, grad_logp.to(logp.dtype), None, None, None, None


class _BackendLinearSegmentStats(torch.autograd.Function):
    """hidden (N, H), weight (V, H), targets, weights, segment_ids (N,) → stats (M, 7) fp32.

    Two backend calls (log-probs, then sums); the backward chains the gather and the linear backward
    (with grad_in_forward, a scaling of the dℓ/dhidden computed in the forward).
    """

    @staticmethod
    def forward(ctx, backend, hidden, weight, targets, weights, segment_ids, num_segments: int,
                log_tau_value: float, ignore_index: int, grad_in_forward: bool):
        logp, _, saved = _linear_forward(ctx, backend, hidden, weight, targets, ignore_index, grad_in_forward)
        stats = backend.segment_stats_fwd(logp, weights, segment_ids, num_segments, log_tau_value)
        ctx.num_linear_saved = len(saved)
        ctx.save_for_backward(*saved, logp, weights, segment_ids)
        ctx.log_tau = log_tau_value
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        saved = ctx.saved_tensors
        logp, weights, segment_ids = saved[ctx.num_linear_saved:]
        grad_logp = ctx.backend.segment_stats_bwd(logp, weights, segment_ids, grad_stats.float().contiguous(),
                                                  ctx.log_tau)
        grad_hidden, grad_weight = _linear_backward(ctx, grad_logp, saved[:ctx.num_linear_saved])
        return None, grad_hidden, grad_weight, None, None, None, None, None, None, None


def _grad_in_forward(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Compute dℓ/dhidden in the forward: a gradient for hidden will be needed and the weight is frozen.

    Decided here, outside autograd.Function.forward (which always runs with grad mode off).
    """
    return torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                   impl: str = "auto") -> torch.Tensor:
    """Per-token log-probs ℓ (N,) fp32 from logits (N, V) fp32/fp16/bf16 and targets (N,) int.

    Differentiable in ``logits`` (gradient in its dtype); ℓ = 0 and zero gradient where targets == ignore_index.
    """
    check_logits_targets(logits, targets)
    impl = _resolve_impl(impl, logits.device, "token_logprobs")
    if impl == "triton":
        return TokenLogprobsFunction.apply(logits, targets, ignore_index)
    return _BackendTokenLogprobs.apply(_backend(impl), logits.contiguous(), targets.long().contiguous(),
                                       ignore_index)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          ignore_index: int = IGNORE_INDEX, impl: str = "auto") -> torch.Tensor:
    """ℓ (N,) fp32 of targets (N,) under logits = hidden (N, H) · weightᵀ (V, H), never storing N×V logits.

    Gradients reach ``hidden`` and, only if it requires grad, ``weight`` (a frozen lm_head costs nothing).
    cpp/torch backends: when ``hidden`` needs a gradient and ``weight`` is frozen, the gradient direction
    dℓ/dhidden (N, H) fp32 is computed in the forward (one matmul more there, none in the backward, whose
    cost is then a scaling); otherwise the backward recomputes the logits.
    """
    check_linear_inputs(hidden, weight, targets)
    impl = _resolve_impl(impl, hidden.device, "linear_token_logprobs")
    if impl == "triton":
        return LinearTokenLogprobsFunction.apply(hidden, weight, targets, ignore_index)
    return _BackendLinearTokenLogprobs.apply(_backend(impl), hidden.contiguous(), weight.contiguous(),
                                             targets.long().contiguous(), ignore_index,
                                             _grad_in_forward(hidden, weight))


def segment_stats(logp: torch.Tensor, weights: torch.Tensor, segment_ids: torch.Tensor, num_segments: int,
                   tau: float, *, impl: str = "auto") -> torch.Tensor:
    """Per-completion sums (M, 7) fp32 of ℓ (N,) with token weights (N,) and segment ids (N,) in [-1, M).

    Columns as in :data:`pvfast.objectives.stats.STAT_FIELDS`; differentiable in ``logp`` only.
    """
    check_segment_inputs(logp, weights, segment_ids, num_segments)
    lt = log_tau(tau)
    impl = _resolve_impl(impl, logp.device, "segment_stats")
    if impl == "triton":
        return SegmentStatsFunction.apply(logp, weights, segment_ids, num_segments, tau)
    return _BackendSegmentStats.apply(_backend(impl), logp.float().contiguous(), weights.float().contiguous(),
                                       segment_ids.long().contiguous(), num_segments, lt)


def linear_segment_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          weights: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, tau: float, *,
                          ignore_index: int = IGNORE_INDEX, impl: str = "auto") -> torch.Tensor:
    """segment_stats(linear_token_logprobs(hidden, weight, targets), weights, segment_ids, M, tau), fused.

    hidden (N, H), weight (V, H), targets/weights/segment_ids (N,) → stats (M, 7) fp32. Gradient of
    ``hidden`` computed in the forward when ``weight`` is frozen, as in :func:`linear_token_logprobs`.
    """
    check_linear_inputs(hidden, weight, targets)
    check_segment_vectors(targets.shape[0], targets.device, weights, segment_ids, num_segments,
                          "linear_segment_stats")
    lt = log_tau(tau)
    impl = _resolve_impl(impl, hidden.device, "linear_segment_stats")
    if impl == "triton":
        return LinearSegmentStatsFunction.apply(hidden, weight, targets, weights, segment_ids, num_segments,
                                                 tau, ignore_index)
    return _BackendLinearSegmentStats.apply(
        _backend(impl), hidden.contiguous(), weight.contiguous(), targets.long().contiguous(),
        weights.float().contiguous(), segment_ids.long().contiguous(), num_segments, lt, ignore_index,
        _grad_in_forward(hidden, weight))


__all__ = ["IMPLS", "NUM_STATS", "TorchBackend", "linear_segment_stats", "linear_token_logprobs",
           "segment_stats", "token_logprobs"]
