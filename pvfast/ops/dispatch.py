"""Public differentiable ops: per-token log-probs and per-completion statistics, with a choice of backend.

    token_logprobs(logits (N,V), targets (N,))                                   -> ℓ (N,) fp32
    linear_token_logprobs(hidden (N,H), weight (V,H), targets (N,))              -> ℓ (N,) fp32
    segment_stats(logp (N,), weights (N,), segment_ids (N,), M, tau)             -> stats (M,7) fp32
    linear_segment_stats(hidden, weight, targets, weights, segment_ids, M, tau)  -> stats (M,7) fp32

ℓ_t = log softmax(logits_t)[y_t], 0 for targets equal to ``ignore_index``; the stats columns are those
of :mod:`pvfast.objectives.stats` (tokens with a negative segment id are not scored; a scored token whose
target is ignored counts with ℓ = 0, so give such tokens segment id −1). The linear ops take
``softcap=c`` to score c·tanh(z/c) instead of the logits z (Gemma 2's ``final_logit_softcapping``).

``impl`` picks the backend (each implements the protocol of :mod:`pvfast.ops.backend`; the autograd
Functions of :mod:`pvfast.ops.functions` run over any of them):
  * ``"triton"``: the kernels in ``pvfast.kernels`` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
    ``linear_segment_stats`` reduces the stats inside the linear forward (fused epilogue).
  * ``"cpp"``: the compiled CPU extension ``pvfast._C`` (loaded by ``pvfast.ops.cpp_backend``).
  * ``"torch"``: the chunked PyTorch backend (works everywhere; memory bounded by the chunk).
  * ``"auto"``: CUDA → triton; CPU → cpp if built, else triton under the interpreter, else torch.

Frozen weight: when ``hidden`` needs a gradient and ``weight`` does not (LoRA, QLoRA), every backend
computes dℓ/dhidden in the forward (4·N·H·V FLOPs per step in all, nothing recomputed in the backward).

Out-of-range indices (a target outside [0, V) that is not ``ignore_index``, a segment id ≥ M): the C++
backend refuses them, the torch backend raises from indexing, the Triton backend refuses them on CPU tensors
and, on CUDA, poisons the result with NaN without a host sync (``PVFAST_CHECK_INDICES=1`` makes it refuse
there too, at one sync per call; see :mod:`pvfast.kernels`).
"""

from __future__ import annotations

import torch

from pvfast.kernels import interpreting
from pvfast.objectives.config import log_tau
from pvfast.objectives.stats import IGNORE_INDEX, NUM_STATS
from pvfast.ops import functions as F
from pvfast.ops.checks import (
    check_linear_inputs,
    check_logits_targets,
    check_segment_inputs,
    check_segment_vectors,
    check_softcap,
)
from pvfast.ops.torch_backend import TorchBackend
from pvfast.ops.triton_backend import TritonBackend

IMPLS = ("auto", "triton", "cpp", "torch")
_TRITON = TritonBackend()


def _cpp_module():
    """The compiled extension, or None (pvfast.ops.cpp_backend warns once when it cannot be loaded)."""
    from pvfast.ops.cpp_backend import cpp_ops

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
    """The backend object of a resolved impl (all three follow pvfast.ops.backend.Backend)."""
    if impl == "cpp":
        return _cpp_module()
    return _TRITON if impl == "triton" else TorchBackend


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
    backend = _backend(_resolve_impl(impl, logits.device, "token_logprobs"))
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()  # every backend takes a row stride
    return F.TokenLogprobs.apply(backend, logits, targets.long().contiguous(), ignore_index)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          ignore_index: int = IGNORE_INDEX, softcap: float | None = None,
                          impl: str = "auto") -> torch.Tensor:
    """ℓ (N,) fp32 of targets (N,) under logits = hidden (N, H) · weightᵀ (V, H), never storing N×V logits.

    ``softcap=c`` scores the capped logits c·tanh(z/c) (forward and every gradient); None = off.
    Gradients reach ``hidden`` and, only if it requires grad, ``weight`` (a frozen lm_head costs nothing).
    When ``hidden`` needs a gradient and ``weight`` is frozen, dℓ/dhidden (N, H) fp32 is computed in the
    forward and the backward is a scaling; otherwise the backward recomputes the logits.
    """
    check_linear_inputs(hidden, weight, targets)
    cap = check_softcap(softcap, "linear_token_logprobs")
    backend = _backend(_resolve_impl(impl, hidden.device, "linear_token_logprobs"))
    return F.LinearTokenLogprobs.apply(backend, hidden.contiguous(), weight.contiguous(), targets.long().contiguous(),
                                       ignore_index, cap, _grad_in_forward(hidden, weight))


def segment_stats(logp: torch.Tensor, weights: torch.Tensor, segment_ids: torch.Tensor, num_segments: int,
                  tau: float, *, impl: str = "auto") -> torch.Tensor:
    """Per-completion sums (M, 7) fp32 of ℓ (N,) with token weights (N,) and segment ids (N,) in [-1, M).

    Columns as in :data:`pvfast.objectives.stats.STAT_FIELDS`; differentiable in ``logp`` only.
    """
    check_segment_inputs(logp, weights, segment_ids, num_segments)
    lt = log_tau(tau)
    backend = _backend(_resolve_impl(impl, logp.device, "segment_stats"))
    return F.SegmentStats.apply(backend, logp.float().contiguous(), weights.float().contiguous(),
                                segment_ids.long().contiguous(), num_segments, lt)


def linear_segment_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, tau: float, *,
                         ignore_index: int = IGNORE_INDEX, softcap: float | None = None,
                         impl: str = "auto") -> torch.Tensor:
    """segment_stats(linear_token_logprobs(hidden, weight, targets), weights, segment_ids, M, tau), fused.

    hidden (N, H), weight (V, H), targets/weights/segment_ids (N,) → stats (M, 7) fp32. ``softcap`` and the
    gradient of ``hidden`` as in :func:`linear_token_logprobs`.
    """
    check_linear_inputs(hidden, weight, targets)
    check_segment_vectors(targets.shape[0], targets.device, weights, segment_ids, num_segments,
                          "linear_segment_stats")
    cap = check_softcap(softcap, "linear_segment_stats")
    lt = log_tau(tau)
    backend = _backend(_resolve_impl(impl, hidden.device, "linear_segment_stats"))
    return F.LinearSegmentStats.apply(
        backend, hidden.contiguous(), weight.contiguous(), targets.long().contiguous(), weights.float().contiguous(),
        segment_ids.long().contiguous(), num_segments, lt, ignore_index, cap, _grad_in_forward(hidden, weight))


__all__ = ["IGNORE_INDEX", "IMPLS", "NUM_STATS", "TorchBackend", "TritonBackend", "linear_segment_stats",
           "linear_token_logprobs", "segment_stats", "token_logprobs"]
