"""Exact PyTorch objectives (SPEC §3): TAB-PO and its baselines, on per-completion statistics.

This module is the oracle every fast path is tested against. Every objective reads only the (M, 7)
per-completion sums of :mod:`pvfast.objectives.stats` (what the fused kernels produce), so the per-token work lives
in one place and the losses are a few vector operations over completions and pairs.

Batch layout::

    stats rows       0    1    2    3    4    5    6        M = 7 completions (any order)
                     c0   r0a  r0b  r0c  c1   r1a  ...      prompt 0: 1 chosen + 3 rejected
    PairIndex.chosen   [0, 0, 0, 4, ...]                    P pairs; a prompt with k rejected gives
    PairIndex.rejected [1, 2, 3, 5, ...]                    k pairs sharing its chosen row
    example_weights    [c0, c0, c0, c1, ...]                (P,) class-balance weight of each pair

The barrier of a pair is the barrier of its chosen completion. Over the P pairs of a batch:

    L = Σ_p c_p L_pref,p / Σ_p c_p  +  λ · Σ_p c_p L_bar,p / Σ_p c_p

with c_p = 1 when class balance is off. Reference statistics are the frozen model's, in the same layout and
computed with the same token weights, without gradient (``None`` for the reference-free SimPO and SFT).

Scores of a completion from its row (``CompletionStats``):
    weighted mean      s(y) = Σ w ℓ / Σ w      (TAB-PO)
    summed             Σ ℓ                     (DPO, IPO, Cal-DPO, DPO-Positive)
    length-averaged    Σ ℓ / n                 (SimPO)
A completion with no scored token scores 0 (the division is guarded, never NaN).

Usage::

    cfg = TabpoConfig.from_preset("released")
    w = effective_token_weights(token_weights, cfg)          # ones when token weighting is off
    policy = stats_from_padded(logp, w, mask, cfg.tau)        # or the fused kernel's (M, 7) output
    with torch.no_grad():
        ref = stats_from_padded(ref_logp, w, mask, cfg.tau)
    out = compute_objective("tabpo", policy, ref, pairs, example_weights, cfg)
    out.loss.backward(); log(out.metrics)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from pvfast.objectives.class_balance import ClassBalanceConfig
from pvfast.objectives.stats import (
    COUNT,
    GATED_COUNT,
    GATED_WEIGHT_SUM,
    GATED_WNLL_SUM,
    LOGP_SUM,
    NUM_STATS,
    STAT_FIELDS,
    WEIGHT_SUM,
    WLOGP_SUM,
    log_tau,
    segment_stats_reference,
)
from pvfast.objectives.weights import TokenWeightConfig

SCORES = ("sum", "mean", "weighted_mean")


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0 where den == 0 (an empty completion has num == 0 too); gradients stay finite."""
    return num / den.masked_fill(den == 0, 1)


# --------------------------------------------------------------------------------------------------
# Per-completion statistics and pairs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionStats:
    """Named view over the (M, NUM_STATS) per-completion statistics of :mod:`pvfast.objectives.stats`.

    Every accessor is an (M,) column view of ``tensor``, so gradients flow back into it.
    """

    tensor: torch.Tensor  # (M, NUM_STATS), columns in STAT_FIELDS order

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, name: str = "stats") -> "CompletionStats":
        """Check the layout; half-precision sums are upcast to float32 for the loss arithmetic."""
        if isinstance(tensor, CompletionStats):
            tensor = tensor.tensor
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor of shape (M, {NUM_STATS}), got {type(tensor).__name__}")
        if tensor.dim() != 2 or tensor.shape[1] != NUM_STATS:
            raise ValueError(f"{name}: expected shape (M, {NUM_STATS}) with columns {STAT_FIELDS}, "
                             f"got {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {tensor.dtype}")
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        return cls(tensor)

    def __len__(self) -> int:
        return self.tensor.shape[0]

    @property
    def logp_sum(self) -> torch.Tensor:
        return self.tensor[:, LOGP_SUM]

    @property
    def wlogp_sum(self) -> torch.Tensor:
        return self.tensor[:, WLOGP_SUM]

    @property
    def weight_sum(self) -> torch.Tensor:
        return self.tensor[:, WEIGHT_SUM]

    @property
    def count(self) -> torch.Tensor:
        return self.tensor[:, COUNT]

    @property
    def gated_wnll_sum(self) -> torch.Tensor:
        return self.tensor[:, GATED_WNLL_SUM]

    @property
    def gated_weight_sum(self) -> torch.Tensor:
        return self.tensor[:, GATED_WEIGHT_SUM]

    @property
    def gated_count(self) -> torch.Tensor:
        return self.tensor[:, GATED_COUNT]

    def weighted_mean(self) -> torch.Tensor:
        """(M,) s(y) = Σ w ℓ / Σ w."""
        return _safe_div(self.wlogp_sum, self.weight_sum)

    def summed(self) -> torch.Tensor:
        """(M,) Σ ℓ."""
        return self.logp_sum

    def length_averaged(self) -> torch.Tensor:
        """(M,) Σ ℓ / n."""
        return _safe_div(self.logp_sum, self.count)

    def score(self, kind: str) -> torch.Tensor:
        """(M,) the score named ``kind``: "sum", "mean" (length-averaged) or "weighted_mean"."""
        if kind == "sum":
            return self.summed()
        if kind == "mean":
            return self.length_averaged()
        if kind == "weighted_mean":
            return self.weighted_mean()
        raise ValueError(f"unknown score {kind!r}; expected one of {SCORES}")


def stats_from_padded(
    logp: torch.Tensor,
    weights: torch.Tensor | None,
    mask: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """Per-completion statistics from per-token log-probs in a padded layout (one completion per row).

    Args:
        logp: (B, T) log-probs ℓ_t of each completion token (already shifted to the token they score).
        weights: (B, T) token weights w_t (pass :func:`effective_token_weights` output), or None for ones.
        mask: (B, T) bool, True where a token is scored.
        tau: confidence threshold of the gate (the objective config's ``tau``).
    Returns:
        (B, NUM_STATS) statistics, row b for completion b (see :func:`pvfast.objectives.stats.segment_stats_reference`).
    """
    if logp.dim() != 2:
        raise ValueError(f"logp: expected shape (B, T), got {tuple(logp.shape)}")
    if weights is None:
        weights = torch.ones_like(logp)
    if weights.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp, weights and mask must share one (B, T) shape, got {tuple(logp.shape)}, "
                         f"{tuple(weights.shape)}, {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor, got {mask.dtype}")
    rows, cols = logp.shape
    row_ids = torch.arange(rows, device=logp.device).unsqueeze(1).expand(rows, cols)
    segment_ids = torch.where(mask, row_ids, torch.full_like(row_ids, -1))
    return segment_stats_reference(logp.reshape(-1), weights.reshape(-1), segment_ids.reshape(-1), rows, tau)


@dataclass(frozen=True)
class PairIndex:
    """Rows of the chosen and rejected completion of each of P pairs in the statistics tensor.

    Indices are checked against the statistics in :func:`compute_objective` while they are on the CPU
    (build them there; a bounds check on an accelerator would stall the launch queue).
    """

    chosen: torch.Tensor  # (P,) int64 row of each pair's chosen completion (shared by a prompt's k pairs)
    rejected: torch.Tensor  # (P,) int64 row of each pair's rejected completion

    def __post_init__(self) -> None:
        for name in ("chosen", "rejected"):
            index = getattr(self, name)
            if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype != torch.int64:
                raise TypeError(f"PairIndex.{name}: expected a 1-D int64 tensor, got "
                                f"{getattr(index, 'dtype', type(index).__name__)} "
                                f"{tuple(getattr(index, 'shape', ()))}")
        if self.chosen.shape != self.rejected.shape:
            raise ValueError(f"PairIndex: chosen {tuple(self.chosen.shape)} and rejected "
                             f"{tuple(self.rejected.shape)} differ in length")
        if self.chosen.numel() == 0:
            raise ValueError("PairIndex: no pairs (a loss over zero pairs is undefined)")
        if self.chosen.device != self.rejected.device:
            raise ValueError(f"PairIndex: chosen on {self.chosen.device}, rejected on {self.rejected.device}")

    @classmethod
    def from_groups(cls, num_rejected: Sequence[int], device: torch.device | str | None = None) -> "PairIndex":
        """Pairs for rows laid out prompt by prompt as [chosen, rejected_1, ..., rejected_k].

        Args:
            num_rejected: k_j >= 1 for each prompt j.
        """
        chosen, rejected, row = [], [], 0
        for j, k in enumerate(num_rejected):
            if k < 1:
                raise ValueError(f"PairIndex.from_groups: prompt {j} has {k} rejected completions (need >= 1)")
            chosen += [row] * k
            rejected += range(row + 1, row + 1 + k)
            row += 1 + k
        return cls(torch.tensor(chosen, dtype=torch.int64, device=device),
                   torch.tensor(rejected, dtype=torch.int64, device=device))

    @property
    def num_pairs(self) -> int:
        return self.chosen.shape[0]

    def to(self, device: torch.device | str) -> "PairIndex":
        return PairIndex(self.chosen.to(device, non_blocking=True), self.rejected.to(device, non_blocking=True))

    def check_bounds(self, num_completions: int) -> None:
        """Raise if an index is outside [0, num_completions) (synchronises if the indices are on a GPU)."""
        for name in ("chosen", "rejected"):
            index = getattr(self, name)
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= num_completions:
                raise IndexError(f"PairIndex.{name} holds rows in [{low}, {high}] but the statistics "
                                 f"have {num_completions} completions")


def repeat_per_pair(values: torch.Tensor, num_rejected: Sequence[int]) -> torch.Tensor:
    """(P,) per-pair values from (J,) per-prompt values (e.g. class-balance weights), k_j copies each."""
    repeats = torch.as_tensor(list(num_rejected), dtype=torch.int64, device=values.device)
    if values.dim() != 1 or values.shape[0] != repeats.shape[0]:
        raise ValueError(f"repeat_per_pair: {tuple(values.shape)} values for {repeats.shape[0]} prompts")
    return values.repeat_interleave(repeats)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectiveConfig:
    """Settings every objective shares: the TW and CB switches and the token weights they govern."""

    token_weighting: bool = False  # TW: False -> every token weight is 1 (see effective_token_weights)
    token_weights: TokenWeightConfig = TokenWeightConfig()  # role and diff weights used when TW is on
    class_balance: ClassBalanceConfig = ClassBalanceConfig()  # CB: enabled=False -> every c_p = 1

    def __post_init__(self) -> None:
        if not isinstance(self.token_weights, TokenWeightConfig):
            raise TypeError(f"{type(self).__name__}.token_weights: expected TokenWeightConfig, "
                            f"got {type(self.token_weights).__name__}")
        if not isinstance(self.class_balance, ClassBalanceConfig):
            raise TypeError(f"{type(self).__name__}.class_balance: expected ClassBalanceConfig, "
                            f"got {type(self.class_balance).__name__}")


def _check_positive(config: ObjectiveConfig, name: str) -> None:
    value = getattr(config, name)
    if not value > 0:
        raise ValueError(f"{type(config).__name__}.{name} must be > 0, got {value}")


def _check_score(config: ObjectiveConfig) -> None:
    if config.score not in SCORES:
        raise ValueError(f"{type(config).__name__}.score must be one of {SCORES}, got {config.score!r}")


@dataclass(frozen=True)
class TabpoConfig(ObjectiveConfig):
    """TAB-PO (SPEC §3). Defaults are the released training code's (preset "released")."""

    token_weighting: bool = True  # TW switch: s(y) and the barrier use the role/diff token weights
    beta: float = 0.5  # β, inverse temperature of the preference term −log σ(β h)
    tau: float = 0.66  # τ, confidence gate: chosen token t is gated when ℓ_t < log τ (stats use it)
    barrier_weight: float = 0.5  # λ, weight of the barrier term in the total loss
    confidence_gate: bool = True  # CG switch: False drops the barrier (L = preference term only)
    # Rescale each chosen completion's weights to mean 1 over its n scored tokens (w̃ = w·n/Σw) before the
    # barrier's max(1, ·) clamp; s(y) is scale-invariant, so only the barrier changes (SPEC §3).
    normalize_barrier_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "beta")
        log_tau(self.tau)  # raises unless 0 < tau <= 1
        if not self.barrier_weight >= 0:
            raise ValueError(f"TabpoConfig.barrier_weight must be >= 0, got {self.barrier_weight}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TabpoConfig":
        """A named preset (see :data:`PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise KeyError(f"unknown TAB-PO preset {name!r}; known presets: {sorted(PRESETS)}")
        return _replace(PRESETS[name], **overrides)


@dataclass(frozen=True)
class DpoConfig(ObjectiveConfig):
    """DPO: −log σ(β h) on summed log-probs."""

    beta: float = 0.1  # β; 0.1 is TRL's DPOConfig default
    score: str = "sum"  # completion score: "sum" (DPO paper) | "mean" | "weighted_mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "beta")
        _check_score(self)


@dataclass(frozen=True)
class IpoConfig(ObjectiveConfig):
    """IPO: (h − 1/(2β))² on summed log-probs (TRL's ``loss_type="ipo"`` uses score="mean")."""

    beta: float = 0.1  # β (IPO's τ regulariser); 0.1 is TRL's default
    score: str = "sum"  # completion score: "sum" | "mean" | "weighted_mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "beta")
        _check_score(self)


@dataclass(frozen=True)
class CalDpoConfig(ObjectiveConfig):
    """Cal-DPO: −log σ(r_w − r_l) + (r_w − 1/(2β))² + (r_l + 1/(2β))², r = log-ratio to the reference."""

    beta: float = 0.1  # β: sets the calibration targets ±1/(2β) of the chosen / rejected log-ratios
    score: str = "sum"  # completion score: "sum" | "mean" | "weighted_mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "beta")
        _check_score(self)


@dataclass(frozen=True)
class DpoPositiveConfig(ObjectiveConfig):
    """DPO-Positive (DPOP): −log σ(β(h − λ_p·max(0, −r_w))), penalising a drop of the chosen log-ratio."""

    beta: float = 0.1  # β, as in DPO
    lambda_p: float = 1.0  # λ_p, weight of the chosen-likelihood penalty (SPEC §3)
    score: str = "sum"  # completion score: "sum" | "mean" | "weighted_mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "beta")
        _check_score(self)
        if not self.lambda_p >= 0:
            raise ValueError(f"DpoPositiveConfig.lambda_p must be >= 0, got {self.lambda_p}")


@dataclass(frozen=True)
class SimpoConfig(ObjectiveConfig):
    """SimPO: −log σ(β(s̄_w − s̄_l) − γ) on length-averaged log-probs, no reference."""

    beta: float = 2.0  # β; 2.0 as in the SimPO paper (TRL's CPOConfig defaults to 0.1)
    gamma: float = 0.5  # γ, target reward margin (SPEC §3)
    score: str = "mean"  # completion score: "mean" (SimPO paper) | "sum" | "weighted_mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "beta")
        _check_score(self)


SFT_REDUCTIONS = ("token", "sequence")


@dataclass(frozen=True)
class SftConfig(ObjectiveConfig):
    """SFT: weighted negative log-likelihood of the target completions.

    reduction "token": L = Σ_i c_i Σ_t w_t(−ℓ_t) / Σ_i c_i Σ_t w_t, a token-weighted mean over the whole
    batch (with unit weights: the mean NLL per token, Hugging Face's causal-LM loss).
    reduction "sequence": L = Σ_i c_i [Σ_t w_t(−ℓ_t) / Σ_t w_t] / Σ_i c_i, each completion counted once.
    """

    token_weighting: bool = True  # TW switch: role weights on the target's tokens (no diff: no rejected)
    reduction: str = "token"  # "token" | "sequence", see the class docstring

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reduction not in SFT_REDUCTIONS:
            raise ValueError(f"SftConfig.reduction must be one of {SFT_REDUCTIONS}, got {self.reduction!r}")


def _replace(config, **overrides):
    unknown = set(overrides) - {f.name for f in dataclasses.fields(config)}
    if unknown:
        raise TypeError(f"{type(config).__name__} has no field(s) {sorted(unknown)}")
    return dataclasses.replace(config, **overrides)


#: Named TAB-PO settings.
#: "released": the released training code (β 0.5, τ 0.66, λ 0.5, w_diff 1.2, CB off).
#: "paper": the paper's text: diff factor 2, weights normalised to mean ≈ 1 over active tokens (the
#:     barrier's w̃ rescaling), τ 0.66, and its second constant 0.85 read as the barrier weight λ.
#: "paper_b085": the other reading of 0.85, as the effective-number b of class balance (sub-code level
#:     only, like the published sweeps); λ then stays at the released 0.5.
PRESETS: Mapping[str, TabpoConfig] = {
    "released": TabpoConfig(),
    "paper": TabpoConfig(token_weights=TokenWeightConfig(w_diff=2.0), barrier_weight=0.85),
    "paper_b085": TabpoConfig(
        token_weights=TokenWeightConfig(w_diff=2.0),
        class_balance=ClassBalanceConfig(enabled=True, b=0.85, levels=("subcode",)),
    ),
}


def effective_token_weights(weights: torch.Tensor, config: ObjectiveConfig) -> torch.Tensor:
    """The token weights the statistics must be computed with under ``config`` (the TW switch).

    Callers pass the role/diff weights built from ``config.token_weights``; with token weighting off the
    objective is defined with every w_t = 1, so this returns ones and the (M, 7) statistics (policy and
    reference alike) must be computed from them.

    Args:
        weights: (...,) per-token weights.
    Returns:
        ``weights`` itself when ``config.token_weighting`` is on, else ones of the same shape and dtype.
    """
    return weights if config.token_weighting else torch.ones_like(weights)


# --------------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------------


@dataclass
class PairTerms:
    """Per-pair terms of a preference objective, all (P,) and differentiable."""

    preference: torch.Tensor  # L_pref,p
    barrier: torch.Tensor | None  # L_bar,p of the pair's chosen completion, None without a barrier
    barrier_weight: float  # λ
    margin: torch.Tensor  # h_p = [score_θ(y+) − score_θ(y−)] − [score_ref(y+) − score_ref(y−)]
    chosen_reward: torch.Tensor  # β (score_θ(y+) − score_ref(y+))
    rejected_reward: torch.Tensor  # β (score_θ(y−) − score_ref(y−))


@dataclass
class ObjectiveOutput:
    """A batch loss (0-dim, differentiable) and its metrics (0-dim, detached)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def _log_ratios(policy: CompletionStats, ref: CompletionStats | None, pairs: PairIndex, score: str):
    """(r_w, r_l): chosen and rejected log-ratios to the reference (plain scores without a reference)."""
    s = policy.score(score)
    if ref is not None:
        s = s - ref.score(score)
    return s[pairs.chosen], s[pairs.rejected]


def chosen_barrier(chosen: CompletionStats, normalize: bool) -> torch.Tensor:
    """(M',) L_bar = Σ w̃ g (−ℓ) / max(1, Σ w̃ g) of each row, with w̃ = w·n/Σw when ``normalize``.

    The gate g is already in the statistics (no gradient through it), so only gated tokens get gradient.
    """
    scale = _safe_div(chosen.count, chosen.weight_sum) if normalize else torch.ones_like(chosen.count)
    return scale * chosen.gated_wnll_sum / (scale * chosen.gated_weight_sum).clamp_min(1.0)


def tabpo_terms(policy: CompletionStats, ref: CompletionStats, pairs: PairIndex, config: TabpoConfig) -> PairTerms:
    """TAB-PO: h on weighted-mean scores, L_pref = −log σ(β h), barrier of the chosen completion."""
    r_w, r_l = _log_ratios(policy, ref, pairs, "weighted_mean")
    h = r_w - r_l
    barrier = None
    if config.confidence_gate:
        barrier = chosen_barrier(CompletionStats(policy.tensor[pairs.chosen]), config.normalize_barrier_weights)
    return PairTerms(-F.logsigmoid(config.beta * h), barrier, config.barrier_weight, h,
                     config.beta * r_w, config.beta * r_l)


def dpo_terms(policy: CompletionStats, ref: CompletionStats, pairs: PairIndex, config: DpoConfig) -> PairTerms:
    """DPO: −log σ(β h)."""
    r_w, r_l = _log_ratios(policy, ref, pairs, config.score)
    h = r_w - r_l
    return PairTerms(-F.logsigmoid(config.beta * h), None, 0.0, h, config.beta * r_w, config.beta * r_l)


def ipo_terms(policy: CompletionStats, ref: CompletionStats, pairs: PairIndex, config: IpoConfig) -> PairTerms:
    """IPO: (h − 1/(2β))²."""
    r_w, r_l = _log_ratios(policy, ref, pairs, config.score)
    h = r_w - r_l
    return PairTerms((h - 0.5 / config.beta) ** 2, None, 0.0, h, config.beta * r_w, config.beta * r_l)


def cal_dpo_terms(policy: CompletionStats, ref: CompletionStats, pairs: PairIndex,
                  config: CalDpoConfig) -> PairTerms:
    """Cal-DPO: −log σ(r_w − r_l) + (r_w − 1/(2β))² + (r_l + 1/(2β))²."""
    r_w, r_l = _log_ratios(policy, ref, pairs, config.score)
    target = 0.5 / config.beta
    loss = -F.logsigmoid(r_w - r_l) + (r_w - target) ** 2 + (r_l + target) ** 2
    return PairTerms(loss, None, 0.0, r_w - r_l, config.beta * r_w, config.beta * r_l)


def dpo_positive_terms(policy: CompletionStats, ref: CompletionStats, pairs: PairIndex,
                       config: DpoPositiveConfig) -> PairTerms:
    """DPO-Positive: −log σ(β(h − λ_p·max(0, −r_w)))."""
    r_w, r_l = _log_ratios(policy, ref, pairs, config.score)
    h = r_w - r_l
    loss = -F.logsigmoid(config.beta * (h - config.lambda_p * torch.relu(-r_w)))
    return PairTerms(loss, None, 0.0, h, config.beta * r_w, config.beta * r_l)


def simpo_terms(policy: CompletionStats, ref: None, pairs: PairIndex, config: SimpoConfig) -> PairTerms:
    """SimPO: −log σ(β(s̄_w − s̄_l) − γ); rewards are β s̄ (no reference)."""
    s_w, s_l = _log_ratios(policy, None, pairs, config.score)
    h = s_w - s_l
    return PairTerms(-F.logsigmoid(config.beta * h - config.gamma), None, 0.0, h,
                     config.beta * s_w, config.beta * s_l)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (weights * values).sum() / weights.sum()


def reduce_pair_terms(terms: PairTerms, weights: torch.Tensor, policy: CompletionStats,
                      pairs: PairIndex) -> ObjectiveOutput:
    """L = Σ c L_pref / Σ c + λ Σ c L_bar / Σ c, plus the metrics (detached, 0-dim)."""
    pref = _weighted_mean(terms.preference, weights)
    loss = pref
    barrier = torch.zeros((), dtype=pref.dtype, device=pref.device)
    if terms.barrier is not None:
        barrier = _weighted_mean(terms.barrier, weights)
        loss = pref + terms.barrier_weight * barrier
    with torch.no_grad():
        chosen = CompletionStats(policy.tensor[pairs.chosen].detach())
        metrics = {
            "loss": loss.detach(),
            "loss_pref": pref.detach(),
            "loss_barrier": barrier.detach(),
            "reward_chosen": terms.chosen_reward.detach().mean(),
            "reward_rejected": terms.rejected_reward.detach().mean(),
            "reward_accuracy": (terms.margin.detach() > 0).to(pref.dtype).mean(),
            "margin": terms.margin.detach().mean(),
            "gated_fraction": _safe_div(chosen.gated_count.sum(), chosen.count.sum()),
            "chosen_logp_mean": _safe_div(chosen.logp_sum.sum(), chosen.count.sum()),
        }
    return ObjectiveOutput(loss, metrics)


def sft_loss(policy: CompletionStats, targets: torch.Tensor, weights: torch.Tensor,
             config: SftConfig) -> ObjectiveOutput:
    """Weighted NLL of the completions at rows ``targets`` (T,), example weights ``weights`` (T,)."""
    rows = CompletionStats(policy.tensor[targets])
    if config.reduction == "token":
        loss = -(weights * rows.wlogp_sum).sum() / (weights * rows.weight_sum).sum()
    else:
        loss = -_weighted_mean(rows.weighted_mean(), weights)
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "nll": loss.detach(),
            "logp_mean": _safe_div(rows.logp_sum.detach().sum(), rows.count.sum()),
            "tokens": rows.count.detach().sum(),
        }
    return ObjectiveOutput(loss, metrics)


@dataclass(frozen=True)
class ObjectiveSpec:
    """One registered objective: its config class, whether it needs reference statistics, its terms."""

    name: str
    config_cls: type
    needs_reference: bool
    pair_terms: Callable[..., PairTerms] | None  # None for SFT (not a pairwise objective)


OBJECTIVES: Mapping[str, ObjectiveSpec] = {
    spec.name: spec
    for spec in (
        ObjectiveSpec("tabpo", TabpoConfig, True, tabpo_terms),
        ObjectiveSpec("dpo", DpoConfig, True, dpo_terms),
        ObjectiveSpec("ipo", IpoConfig, True, ipo_terms),
        ObjectiveSpec("cal_dpo", CalDpoConfig, True, cal_dpo_terms),
        ObjectiveSpec("dpo_positive", DpoPositiveConfig, True, dpo_positive_terms),
        ObjectiveSpec("simpo", SimpoConfig, False, simpo_terms),
        ObjectiveSpec("sft", SftConfig, False, None),
    )
}


def objective_spec(name: str) -> ObjectiveSpec:
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; known objectives: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def default_config(name: str) -> ObjectiveConfig:
    """The default config of objective ``name``."""
    return objective_spec(name).config_cls()


def _example_weights(example_weights: torch.Tensor | None, n: int, config: ObjectiveConfig,
                     like: torch.Tensor, what: str) -> torch.Tensor:
    if not config.class_balance.enabled:
        return torch.ones(n, dtype=like.dtype, device=like.device)  # CB off: c = 1 whatever was passed
    if example_weights is None:
        raise ValueError("class balance is enabled in the config but no example_weights were passed")
    if example_weights.shape != (n,):
        raise ValueError(f"example_weights: expected shape ({n},) (one per {what}), "
                         f"got {tuple(example_weights.shape)}")
    return example_weights.to(device=like.device, dtype=like.dtype)


def compute_objective(
    name: str,
    policy_stats: torch.Tensor | CompletionStats,
    ref_stats: torch.Tensor | CompletionStats | None,
    pairs: PairIndex | None,
    example_weights: torch.Tensor | None = None,
    config: ObjectiveConfig | None = None,
) -> ObjectiveOutput:
    """The batch loss and metrics of objective ``name`` (see :data:`OBJECTIVES`).

    Args:
        name: "tabpo", "dpo", "ipo", "cal_dpo", "dpo_positive", "simpo" or "sft".
        policy_stats: (M, 7) policy statistics (gradient flows into its ℓ-derived columns).
        ref_stats: (M, 7) reference statistics in the same rows and token weights (no grad), or None for
            the reference-free objectives (simpo, sft), which reject a reference.
        pairs: chosen/rejected rows of P pairs. For "sft" the targets are ``pairs.chosen`` (one per pair),
            or every row when ``pairs`` is None.
        example_weights: (P,) class-balance weight per pair ((M,) per row for "sft" without pairs); used
            only when ``config.class_balance.enabled``, and then required.
        config: the objective's config; None gives its defaults.
    Returns:
        ObjectiveOutput with a 0-dim loss and detached 0-dim metrics.
    """
    spec = objective_spec(name)
    if config is None:
        config = spec.config_cls()
    if not isinstance(config, spec.config_cls):
        raise TypeError(f"objective {name!r} takes a {spec.config_cls.__name__}, got {type(config).__name__}")
    policy = CompletionStats.from_tensor(policy_stats, "policy_stats")
    num_completions = len(policy)

    ref = None
    if spec.needs_reference:
        if ref_stats is None:
            raise ValueError(f"objective {name!r} needs reference statistics (ref_stats is None)")
        ref = CompletionStats.from_tensor(ref_stats, "ref_stats")
        if ref.tensor.shape != policy.tensor.shape:
            raise ValueError(f"ref_stats shape {tuple(ref.tensor.shape)} differs from policy_stats "
                             f"shape {tuple(policy.tensor.shape)}")
        ref = CompletionStats(ref.tensor.detach().to(policy.tensor.dtype))
    elif ref_stats is not None:
        raise ValueError(f"objective {name!r} is reference-free; pass ref_stats=None "
                         f"(computing a reference pass for it is wasted work)")

    if pairs is not None:
        if pairs.chosen.device.type == "cpu":
            pairs.check_bounds(num_completions)
        pairs = pairs.to(policy.tensor.device)

    if spec.pair_terms is None:  # SFT
        if pairs is None:
            targets = torch.arange(num_completions, device=policy.tensor.device)
            what = "completion"
        else:
            targets, what = pairs.chosen, "pair"
        weights = _example_weights(example_weights, targets.shape[0], config, policy.tensor, what)
        return sft_loss(policy, targets, weights, config)

    if pairs is None:
        raise ValueError(f"objective {name!r} is pairwise and needs a PairIndex")
    weights = _example_weights(example_weights, pairs.num_pairs, config, policy.tensor, "pair")
    terms = spec.pair_terms(policy, ref, pairs, config)
    return reduce_pair_terms(terms, weights, policy, pairs)
