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
    w = token_weights(roles, diff, cfg)                       # pvfast.objectives.weights (the TW switch)
    policy = stats_from_padded(logp, w, mask, cfg.gate_tau)   # or the fused kernel's (M, 7) output
    with torch.no_grad():
        ref = stats_from_padded(ref_logp, w, mask, cfg.gate_tau)
    out = compute_objective("tabpo", policy, ref, pairs, example_weights, cfg)
    out.loss.backward(); log(out.metrics)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from pvfast.objectives.config import (
    OBJECTIVE_CONFIGS,
    SCORES,
    CalDpoConfig,
    DpoConfig,
    DpoPositiveConfig,
    IpoConfig,
    ObjectiveConfig,
    SftConfig,
    SimpoConfig,
    TabpoConfig,
    objective_config_class,
)
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
    segment_stats_reference,
)


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
        weights: (B, T) token weights w_t (:func:`pvfast.objectives.weights.token_weights`), or None for ones.
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
    """A batch loss and its metrics, with the loss split into a sum and its normaliser.

    ``loss = loss_sum / normalizer``. Every objective is a ratio of two sums over the batch's units (pairs,
    completions or tokens; see each objective), so the loss of several micro-batches (or ranks) together is
    ``Σ loss_sum / Σ normalizer``, whatever the split: a trainer that accumulates gradients backpropagates
    ``loss_sum`` and divides by the step's total ``normalizer`` (the pvfast trainer does,
    :mod:`pvfast.train.loop`). ``metrics`` are 0-dim detached means; ``metric_counts[name]`` is the count
    behind the mean (so means combine exactly over micro-batches), None for a metric that is a plain sum.
    """

    loss: torch.Tensor  # 0-dim, differentiable
    loss_sum: torch.Tensor  # 0-dim, differentiable: the numerator
    normalizer: torch.Tensor  # 0-dim, detached: the denominator (data only, no model output)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    metric_counts: dict[str, torch.Tensor | None] = field(default_factory=dict)


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


def reduce_pair_terms(terms: PairTerms, weights: torch.Tensor, policy: CompletionStats,
                      pairs: PairIndex) -> ObjectiveOutput:
    """L = Σ c L_pref / Σ c + λ Σ c L_bar / Σ c as (Σ c (L_pref + λ L_bar)) / Σ c, plus the metrics."""
    normalizer = weights.sum().detach()
    pref_sum = (weights * terms.preference).sum()
    loss_sum = pref_sum
    barrier_sum = torch.zeros_like(pref_sum)
    if terms.barrier is not None:
        barrier_sum = (weights * terms.barrier).sum()
        loss_sum = pref_sum + terms.barrier_weight * barrier_sum
    loss = loss_sum / normalizer
    with torch.no_grad():
        chosen = CompletionStats(policy.tensor[pairs.chosen].detach())
        rejected = CompletionStats(policy.tensor[pairs.rejected].detach())
        pairs_count = torch.tensor(float(pairs.num_pairs), device=loss.device)
        metrics = {
            "loss": loss.detach(),
            "loss_pref": pref_sum.detach() / normalizer,
            "loss_barrier": barrier_sum.detach() / normalizer,
            "reward_chosen": terms.chosen_reward.detach().mean(),
            "reward_rejected": terms.rejected_reward.detach().mean(),
            "reward_accuracy": (terms.margin.detach() > 0).to(loss.dtype).mean(),
            "margin": terms.margin.detach().mean(),
            "gated_fraction": _safe_div(chosen.gated_count.sum(), chosen.count.sum()),
            "chosen_logp_mean": _safe_div(chosen.logp_sum.sum(), chosen.count.sum()),
            "rejected_logp_mean": _safe_div(rejected.logp_sum.sum(), rejected.count.sum()),
        }
        counts = {"loss": normalizer, "loss_pref": normalizer, "loss_barrier": normalizer,
                  "reward_chosen": pairs_count, "reward_rejected": pairs_count, "reward_accuracy": pairs_count,
                  "margin": pairs_count, "gated_fraction": chosen.count.sum(),
                  "chosen_logp_mean": chosen.count.sum(), "rejected_logp_mean": rejected.count.sum()}
    return ObjectiveOutput(loss, loss_sum, normalizer, metrics, counts)


def sft_loss(policy: CompletionStats, targets: torch.Tensor, weights: torch.Tensor,
             config: SftConfig) -> ObjectiveOutput:
    """Weighted NLL of the completions at rows ``targets`` (T,), example weights ``weights`` (T,).

    reduction "token": Σ_i c_i Σ_t w_t(−ℓ_t) / Σ_i c_i Σ_t w_t; "sequence": Σ_i c_i s̄_i / Σ_i c_i with
    s̄_i = Σ_t w_t(−ℓ_t) / Σ_t w_t.
    """
    rows = CompletionStats(policy.tensor[targets])
    if config.reduction == "token":
        loss_sum = -(weights * rows.wlogp_sum).sum()
        normalizer = (weights * rows.weight_sum).sum()  # Σ w is data: no gradient reaches ℓ through it
    else:
        loss_sum = -(weights * rows.weighted_mean()).sum()
        normalizer = weights.sum()
    loss = loss_sum / normalizer
    normalizer = normalizer.detach()
    with torch.no_grad():
        tokens = rows.count.detach().sum()
        metrics = {
            "loss": loss.detach(),
            "nll": loss.detach(),
            "logp_mean": _safe_div(rows.logp_sum.detach().sum(), tokens),
            "tokens": tokens,
        }
        counts = {"loss": normalizer, "nll": normalizer, "logp_mean": tokens, "tokens": None}
    return ObjectiveOutput(loss, loss_sum, normalizer, metrics, counts)


@dataclass(frozen=True)
class ObjectiveSpec:
    """One registered objective: its config class, whether it needs reference statistics, its terms."""

    name: str
    config_cls: type
    needs_reference: bool
    pair_terms: Callable[..., PairTerms] | None  # None for SFT (not a pairwise objective)


_PAIR_TERMS: Mapping[str, Callable[..., PairTerms]] = {
    "tabpo": tabpo_terms, "dpo": dpo_terms, "ipo": ipo_terms, "cal_dpo": cal_dpo_terms,
    "dpo_positive": dpo_positive_terms, "simpo": simpo_terms,
}
OBJECTIVES: Mapping[str, ObjectiveSpec] = {
    name: ObjectiveSpec(name, cls, cls.needs_reference, _PAIR_TERMS.get(name) if cls.pairwise else None)
    for name, cls in OBJECTIVE_CONFIGS.items()
}


def objective_spec(name: str) -> ObjectiveSpec:
    objective_config_class(name)  # KeyError naming the known objectives
    return OBJECTIVES[name]


def _example_weights(example_weights: torch.Tensor | None, n: int, like: torch.Tensor, what: str) -> torch.Tensor:
    if example_weights is None:
        return torch.ones(n, dtype=like.dtype, device=like.device)  # c = 1: no class balance
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
        example_weights: (P,) class-balance weight c per pair ((M,) per row for "sft" without pairs); given
            exactly when ``config.class_balance.enabled`` (from
            :func:`pvfast.objectives.class_balance.class_balance_table`), None otherwise (c = 1). A mismatch is
            an error, never silently resolved.
        config: the objective's config; None gives its defaults.
    Returns:
        ObjectiveOutput with a 0-dim loss and detached 0-dim metrics.
    """
    spec = objective_spec(name)
    if config is None:
        config = spec.config_cls()
    if not isinstance(config, spec.config_cls):
        raise TypeError(f"objective {name!r} takes a {spec.config_cls.__name__}, got {type(config).__name__}")
    if config.class_balance.enabled != (example_weights is not None):
        raise ValueError("class balance is enabled in the config but no example_weights were given"
                         if config.class_balance.enabled else
                         "example_weights were given but class balance is off in the config "
                         "(class_balance.enabled); they would change the objective")
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
        weights = _example_weights(example_weights, targets.shape[0], policy.tensor, what)
        return sft_loss(policy, targets, weights, config)

    if pairs is None:
        raise ValueError(f"objective {name!r} is pairwise and needs a PairIndex")
    weights = _example_weights(example_weights, pairs.num_pairs, policy.tensor, "pair")
    terms = spec.pair_terms(policy, ref, pairs, config)
    return reduce_pair_terms(terms, weights, policy, pairs)
