"""Per-completion (segment) statistics: the contract between the kernels and the objectives, defined once.

Every objective in SPEC §3 needs only a few sums per completion, so the fused kernels reduce per-token
log-probs ℓ_t straight into these sums (one row per completion, one column per field) and the losses
read them from there. Tokens with a negative segment id (prompt, padding, ignored) are not scored.

Columns, per completion m (sums over its scored tokens t), with the gate g_t = 1[ℓ_t < log τ]:

    0 logp_sum          Σ ℓ_t
    1 wlogp_sum         Σ w_t ℓ_t
    2 weight_sum        Σ w_t
    3 count             n = number of scored tokens
    4 gated_wnll_sum    Σ w_t g_t (−ℓ_t)
    5 gated_weight_sum  Σ w_t g_t
    6 gated_count       Σ g_t

The gate carries no gradient, so with G = dL/dstats the gradient of a token of completion m is

    dL/dℓ_t = G[m,0] + w_t G[m,1] − w_t g_t G[m,4]

This module is the single definition: :data:`STAT_COLUMNS` holds each column's value and its derivative
d column / dℓ as expressions in ``l`` (ℓ_t), ``w`` (w_t) and ``g`` (g_t), and :data:`GATE_EXPR` the gate.
The torch functions below evaluate them; ``python -m pvfast.ops.codegen`` writes them into the C++ header
``csrc/pvfast_stats.h`` and the Triton helpers ``kernels/stats_math.py`` (tests fail when either is
stale), and every backend's forward and backward is tested against :func:`segment_stats_reference`.

:data:`IGNORE_INDEX` (the target id of an unscored position) is defined here too, once for the project.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass

import torch

from pvfast.objectives.config import log_tau as _log_tau

# Target id of positions that are not scored (Hugging Face's convention): ℓ = 0 and no gradient there.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class StatColumn:
    """One column: its name, its value per token and its derivative with respect to ℓ.

    ``value`` and ``dlogp`` are arithmetic expressions in ``l``, ``w``, ``g`` (and numeric literals) valid in
    Python, C++ and Triton alike; ``dlogp`` is None when the column does not depend on ℓ.
    """

    name: str
    doc: str
    value: str
    dlogp: str | None


STAT_COLUMNS = (
    StatColumn("logp_sum", "Σ ℓ", "l", "1.0"),
    StatColumn("wlogp_sum", "Σ w ℓ", "w * l", "w"),
    StatColumn("weight_sum", "Σ w", "w", None),
    StatColumn("count", "number of scored tokens", "1.0", None),
    StatColumn("gated_wnll_sum", "Σ w g (−ℓ)", "-(w * g * l)", "-(w * g)"),
    StatColumn("gated_weight_sum", "Σ w g", "w * g", None),
    StatColumn("gated_count", "Σ g", "g", None),
)
# g = 1[ℓ < log τ], strict, compared in the precision of ℓ (fp32 in every kernel); no gradient.
GATE_EXPR = "l < log_tau"

STAT_FIELDS = tuple(c.name for c in STAT_COLUMNS)
NUM_STATS = len(STAT_COLUMNS)
LOGP_SUM, WLOGP_SUM, WEIGHT_SUM, COUNT, GATED_WNLL_SUM, GATED_WEIGHT_SUM, GATED_COUNT = range(NUM_STATS)
# Columns that depend on ℓ (the only ones whose upstream gradient matters).
DIFFERENTIABLE_COLUMNS = tuple(i for i, c in enumerate(STAT_COLUMNS) if c.dlogp is not None)


def _evaluate(expr: str, like: torch.Tensor, **names: torch.Tensor) -> torch.Tensor:
    """An expression of STAT_COLUMNS on tensors (a literal becomes a tensor shaped like ``like``)."""
    # Real builtins: torch's tensor operators may import lazily on first use (an empty __builtins__ broke that).
    value = eval(compile(expr, "<stats contract>", "eval"), {"__builtins__": builtins}, names)  # noqa: S307
    return torch.broadcast_to(torch.as_tensor(value, dtype=like.dtype, device=like.device), like.shape)


def gate(logp: torch.Tensor, log_tau: float) -> torch.Tensor:
    """g = 1[ℓ < log τ] in the dtype of ℓ, without gradient."""
    return _evaluate(GATE_EXPR, logp, l=logp.detach(), log_tau=log_tau).to(logp.dtype)


def token_stat_columns(logp: torch.Tensor, weights: torch.Tensor, log_tau: float) -> torch.Tensor:
    """(n, NUM_STATS) per-token column values; differentiable in ``logp`` through the columns' ℓ terms."""
    w = weights.to(logp.dtype)
    g = gate(logp, log_tau)
    return torch.stack([_evaluate(c.value, logp, l=logp, w=w, g=g) for c in STAT_COLUMNS], dim=1)


def token_logp_grad(grad_rows: torch.Tensor, logp: torch.Tensor, weights: torch.Tensor,
                    log_tau: float) -> torch.Tensor:
    """dL/dℓ_t = Σ_c G[t, c] · d column_c / dℓ_t for per-token upstream rows G (n, NUM_STATS)."""
    w = weights.to(grad_rows.dtype)
    g = gate(logp, log_tau).to(grad_rows.dtype)
    grad = torch.zeros_like(w)
    for i in DIFFERENTIABLE_COLUMNS:
        grad = grad + grad_rows[:, i] * _evaluate(STAT_COLUMNS[i].dlogp, w, w=w, g=g)
    return grad


def _check_vectors(logp, weights, segment_ids) -> None:
    if logp.shape != weights.shape or logp.shape != segment_ids.shape or logp.dim() != 1:
        raise ValueError(f"logp, weights and segment_ids must be equal 1-D shapes, got "
                         f"{tuple(logp.shape)}, {tuple(weights.shape)}, {tuple(segment_ids.shape)}")


def segment_stats_sums(logp: torch.Tensor, weights: torch.Tensor, segment_ids: torch.Tensor,
                       num_segments: int, log_tau: float) -> torch.Tensor:
    """(M, NUM_STATS) sums of :func:`token_stat_columns` per segment, in the dtype of ``logp``.

    Segment ids lie in [0, M) for scored tokens, negative for unscored ones. Differentiable in ``logp``.
    """
    _check_vectors(logp, weights, segment_ids)
    scored = segment_ids >= 0
    cols = token_stat_columns(logp[scored], weights[scored], log_tau)
    out = torch.zeros(num_segments, NUM_STATS, dtype=logp.dtype, device=logp.device)
    return out.index_add(0, segment_ids[scored].long(), cols)


def segment_stats_grad(logp: torch.Tensor, weights: torch.Tensor, segment_ids: torch.Tensor,
                       grad_stats: torch.Tensor, log_tau: float) -> torch.Tensor:
    """dL/dℓ (N,) from dL/dstats (M, NUM_STATS): a gather of each token's segment row; 0 if unscored."""
    _check_vectors(logp, weights, segment_ids)
    seg = segment_ids.long()
    scored = seg >= 0
    grad = token_logp_grad(grad_stats[seg.clamp(min=0)], logp, weights, log_tau)
    return torch.where(scored, grad, torch.zeros_like(grad))


def segment_stats_reference(
    logp: torch.Tensor,
    weights: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    tau: float,
) -> torch.Tensor:
    """Torch reference of the statistics (the oracle for every backend), differentiable in ``logp``.

    Args:
        logp: (N,) per-token log-probs ℓ_t (any float dtype; the sums keep it).
        weights: (N,) token weights w_t.
        segment_ids: (N,) int completion index of each token in [0, num_segments), or negative if unscored.
        num_segments: M, the number of completions.
        tau: confidence threshold of the gate, in (0, 1].
    Returns:
        (M, NUM_STATS) tensor in the column order of :data:`STAT_FIELDS`.
    """
    return segment_stats_sums(logp, weights, segment_ids, num_segments, _log_tau(tau))
