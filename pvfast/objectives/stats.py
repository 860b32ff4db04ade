"""Per-completion (segment) statistics: the contract between the kernels and the objectives.

Every objective in SPEC §3 needs only a few sums per completion, so the fused kernels reduce per-token
log-probs ℓ_t straight into these sums (one row per completion, one column per field) and the losses
read them from there. Tokens with ``segment_id == -1`` (prompt, padding, ignored) are not scored.

Columns, per completion m (sums over its scored tokens t):

    0 logp_sum          Σ ℓ_t
    1 wlogp_sum         Σ w_t ℓ_t
    2 weight_sum        Σ w_t
    3 count             n = number of scored tokens
    4 gated_wnll_sum    Σ w_t g_t (−ℓ_t)        g_t = 1[ℓ_t < log τ], no gradient through g_t
    5 gated_weight_sum  Σ w_t g_t
    6 gated_count       Σ g_t

Only ℓ_t carries a gradient: columns 0, 1 and 4 are differentiable, the others are data.
"""

from __future__ import annotations

import torch

from pvfast.objectives.config import log_tau

STAT_FIELDS = (
    "logp_sum",
    "wlogp_sum",
    "weight_sum",
    "count",
    "gated_wnll_sum",
    "gated_weight_sum",
    "gated_count",
)
NUM_STATS = len(STAT_FIELDS)
LOGP_SUM, WLOGP_SUM, WEIGHT_SUM, COUNT, GATED_WNLL_SUM, GATED_WEIGHT_SUM, GATED_COUNT = range(NUM_STATS)


def segment_stats_reference(
    logp: torch.Tensor,
    weights: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    tau: float,
) -> torch.Tensor:
    """Torch reference of the fused epilogue (the oracle for the Triton and C++ versions).

    Args:
        logp: (N,) per-token log-probs ℓ_t (any float dtype; the sums keep it).
        weights: (N,) token weights w_t.
        segment_ids: (N,) int64 completion index of each token in [0, num_segments), or -1 if unscored.
        num_segments: M, the number of completions.
        tau: confidence threshold of the gate.
    Returns:
        (M, NUM_STATS) tensor in the column order of :data:`STAT_FIELDS`.
    """
    if logp.shape != weights.shape or logp.shape != segment_ids.shape or logp.dim() != 1:
        raise ValueError(f"logp, weights and segment_ids must be equal 1-D shapes, got "
                         f"{tuple(logp.shape)}, {tuple(weights.shape)}, {tuple(segment_ids.shape)}")
    scored = segment_ids >= 0
    seg = segment_ids[scored]
    lp = logp[scored]
    w = weights[scored].to(lp.dtype)
    gate = (lp.detach() < log_tau(tau)).to(lp.dtype)
    cols = torch.stack([lp, w * lp, w, torch.ones_like(lp), w * gate * (-lp), w * gate, gate], dim=1)
    out = torch.zeros(num_segments, NUM_STATS, dtype=lp.dtype, device=lp.device)
    return out.index_add(0, seg, cols)
