"""The backend protocol: what a backend (torch reference, C++ extension, Triton kernels) implements.

One argument convention for all of them, so that one autograd Function per op (``pvfast.ops.functions``)
runs over any backend:

* tensors arrive checked and normalised by ``pvfast.ops.dispatch``: contiguous, ``targets`` and
  ``segment_ids`` int64, ``weights`` float32, ``logits``/``hidden``/``weight`` float32, float16 or bfloat16;
* ``ignore_index``: target id of unscored rows (ℓ = lse = 0, zero gradient);
* ``softcap``: c > 0 replaces every logit z by z' = c·tanh(z/c) before the log-softmax, 0.0 = off;
* ``log_tau``: the gate threshold log τ of the statistics (never τ itself);
* per-token outputs (logp, lse, grad_logp) and stats are float32; ``direction`` is dℓ/dhidden (N, H)
  float32 (zero rows for ignored targets); gradients w.r.t. logits/hidden/weight come in their dtype;
* ``grad_weight`` is an empty tensor when ``need_weight_grad`` is False.

The statistics contract (columns and math) is :mod:`pvfast.objectives.stats`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

Tensor = torch.Tensor


@runtime_checkable
class Backend(Protocol):
    """The functions every backend provides (the C++ module ``pvfast._C`` matches it as is)."""

    def token_logprobs_fwd(self, logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
        """logits (N, V) → (logp (N,), lse (N,))."""

    def token_logprobs_bwd(self, logits: Tensor, targets: Tensor, lse: Tensor, grad_logp: Tensor,
                           ignore_index: int) -> Tensor:
        """→ grad_logits (N, V) in the dtype of logits."""

    def linear_token_logprobs_fwd(self, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int,
                                  softcap: float) -> tuple[Tensor, Tensor]:
        """hidden (N, H), weight (V, H) → (logp (N,), lse (N,)) of logits hidden·weightᵀ (capped)."""

    def linear_token_logprobs_fwd_with_grad(self, hidden: Tensor, weight: Tensor, targets: Tensor,
                                            ignore_index: int, softcap: float) -> tuple[Tensor, Tensor, Tensor]:
        """→ (logp, lse, direction (N, H) fp32 = dℓ_t/dh_t); for a frozen weight the backward is a scaling."""

    def linear_token_logprobs_bwd(self, hidden: Tensor, weight: Tensor, targets: Tensor, lse: Tensor,
                                  grad_logp: Tensor, ignore_index: int, softcap: float,
                                  need_weight_grad: bool) -> tuple[Tensor, Tensor]:
        """→ (grad_hidden (N, H), grad_weight (V, H) or empty), recomputing the logits."""

    def segment_stats_fwd(self, logp: Tensor, weights: Tensor, segment_ids: Tensor, num_segments: int,
                          log_tau: float) -> Tensor:
        """→ stats (M, NUM_STATS) fp32."""

    def segment_stats_bwd(self, logp: Tensor, weights: Tensor, segment_ids: Tensor, grad_stats: Tensor,
                          log_tau: float) -> Tensor:
        """dL/dstats (M, NUM_STATS) → dL/dℓ (N,) fp32."""


class FusedLinearStats(Protocol):
    """Optional: a backend that reduces the statistics inside the linear forward (fused epilogue).

    ``linear_segment_stats_fwd(hidden, weight, targets, weights, segment_ids, num_segments, log_tau,
    ignore_index, softcap, with_grad) -> (logp, lse, stats, direction or None)``. Backends without it get
    the composition ``linear_token_logprobs_fwd[_with_grad]`` then ``segment_stats_fwd``.
    """

    def linear_segment_stats_fwd(self, hidden: Tensor, weight: Tensor, targets: Tensor, weights: Tensor,
                                 segment_ids: Tensor, num_segments: int, log_tau: float, ignore_index: int,
                                 softcap: float, with_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        ...


BACKEND_FUNCTIONS = ("token_logprobs_fwd", "token_logprobs_bwd", "linear_token_logprobs_fwd",
                     "linear_token_logprobs_fwd_with_grad", "linear_token_logprobs_bwd", "segment_stats_fwd",
                     "segment_stats_bwd")
