"""Objective settings (SPEC §2, §3): token weights, class balance and every objective's config, torch-free.

Each config class names its objective (``name``), says whether it needs reference statistics and whether
it is pairwise; the loss functions in :mod:`pvfast.objectives.losses` read nothing else. Defaults are the
released training code's; :data:`PRESETS` names the published TAB-PO settings.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Mapping

from pvfast.config.checks import require, require_choice
from pvfast.data.roles import ROLE_CODE, ROLE_NAMES, ROLE_SCAFFOLD, ROLE_SPAN, ROLE_SUBCODE

SCORES = ("sum", "mean", "weighted_mean")
LEVELS = ("code", "subcode")
COMBINE_MODES = ("mean", "max", "geometric")


def log_tau(tau: float) -> float:
    """The gate threshold on log-probs; tau must lie in (0, 1]."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"confidence threshold tau must be in (0, 1], got {tau}")
    return math.log(tau)


@dataclass(frozen=True)
class TokenWeightConfig:
    """Token weights; the defaults are the released training code's (SPEC §3)."""

    w_scaffold: float = 1.0  # everything outside a field value, end-of-turn token included
    w_code: float = 1.1  # tokens inside a Code value
    w_subcode: float = 1.2  # tokens inside a Sub-code value
    w_span: float = 1.1  # tokens inside a Span value
    w_diff: float = 1.2  # extra factor where chosen and rejected differ (token alignment)

    def __post_init__(self) -> None:
        for name in ("w_scaffold", "w_code", "w_subcode", "w_span", "w_diff"):
            value = getattr(self, name)
            require(self, name, isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                    "a finite number > 0")

    def role_weight(self, role: int) -> float:
        if role == ROLE_SCAFFOLD:
            return self.w_scaffold
        base = {ROLE_CODE: self.w_code, ROLE_SUBCODE: self.w_subcode, ROLE_SPAN: self.w_span}
        if role not in base:
            raise ValueError(f"no weight for role {role} ({ROLE_NAMES.get(role, 'unknown')})")
        return max(self.w_scaffold, base[role])


@dataclass(frozen=True)
class ClassBalanceConfig:
    """Effective-number class balance; off by default (the released training code's setting)."""

    enabled: bool = False  # CB switch: off -> every example weight c_i = 1
    b: float = 0.99  # effective-number constant in [0, 1); published sweeps: 0.99 0.95 0.93 0.92 0.90 0.85 0.80
    levels: tuple[str, ...] = LEVELS  # label levels used; the published sweeps used ("subcode",) only
    combine: str = "mean"  # how the code- and sub-code-level weights combine: mean | max | geometric
    cap: float = 3.0  # upper bound on c_i, applied before and after renormalising to mean 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        require(self, "b", 0.0 <= self.b < 1.0, "in [0, 1)")
        require(self, "levels", bool(self.levels) and all(level in LEVELS for level in self.levels)
                and len(set(self.levels)) == len(self.levels), f"a non-empty subset of {LEVELS} without repeats")
        require_choice(self, "combine", COMBINE_MODES)
        # A cap below 1 would make the renormalised mean-1 weights impossible to respect.
        require(self, "cap", self.cap >= 1.0, ">= 1.0")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Settings every objective shares: the TW and CB switches and the token weights they govern."""

    token_weighting: bool = False  # TW: False -> every token weight is 1 (pvfast.objectives.weights)
    token_weights: TokenWeightConfig = TokenWeightConfig()  # role and diff weights used when TW is on
    class_balance: ClassBalanceConfig = ClassBalanceConfig()  # CB: enabled=False -> every c_p = 1

    objective: ClassVar[str]  # the registry name (pvfast.objectives.losses registers its terms by it)
    needs_reference: ClassVar[bool] = True  # reference statistics (SPEC §3: the SFT model)
    pairwise: ClassVar[bool] = True  # chosen/rejected pairs (False: every completion is a target)

    def __post_init__(self) -> None:
        # Fields several objectives share are checked once, here.
        if hasattr(self, "beta"):
            _check_positive(self, "beta")
        if hasattr(self, "score"):
            require_choice(self, "score", SCORES)
            # Only the weighted mean reads the weighted columns: token weighting would silently do nothing.
            require(self, "token_weighting", not self.token_weighting or self.score == "weighted_mean",
                    f"false with score {self.score!r} (only score 'weighted_mean' uses token weights)")
        if not isinstance(self.token_weights, TokenWeightConfig):
            raise TypeError(f"{type(self).__name__}.token_weights: expected TokenWeightConfig, "
                            f"got {type(self.token_weights).__name__}")
        if not isinstance(self.class_balance, ClassBalanceConfig):
            raise TypeError(f"{type(self).__name__}.class_balance: expected ClassBalanceConfig, "
                            f"got {type(self.class_balance).__name__}")

    @property
    def gate_tau(self) -> float:
        """τ of the confidence gate the statistics are computed with. Only TAB-PO reads the gated columns;
        for the others any threshold serves, and 1.0 (log τ = 0) is used."""
        return 1.0

    def statistics_settings(self) -> dict[str, object]:
        """Everything of this config that shapes the (M, 7) statistics of a batch (precomputed reference
        statistics are keyed by it, :mod:`pvfast.model.reference`): the gate threshold and the token weights."""
        settings: dict[str, object] = {"gate_tau": self.gate_tau, "token_weighting": self.token_weighting}
        if self.token_weighting:
            settings["token_weights"] = dataclasses.asdict(self.token_weights)
        return settings


def _check_positive(config: ObjectiveConfig, name: str) -> None:
    require(config, name, getattr(config, name) > 0, "> 0")


@dataclass(frozen=True)
class TabpoConfig(ObjectiveConfig):
    """TAB-PO (SPEC §3). Defaults are the released training code's (preset "released")."""

    objective: ClassVar[str] = "tabpo"

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
        require(self, "tau", 0.0 < self.tau <= 1.0, "in (0, 1]")
        require(self, "barrier_weight", self.barrier_weight >= 0, ">= 0")

    @property
    def gate_tau(self) -> float:
        return self.tau

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TabpoConfig":
        """A named preset (see :data:`PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise KeyError(f"unknown TAB-PO preset {name!r}; known presets: {sorted(PRESETS)}")
        return _replace(PRESETS[name], **overrides)


@dataclass(frozen=True)
class DpoConfig(ObjectiveConfig):
    """DPO: −log σ(β h) on summed log-probs."""

    objective: ClassVar[str] = "dpo"

    beta: float = 0.1  # β; 0.1 is TRL's DPOConfig default
    score: str = "sum"  # completion score: "sum" (DPO paper) | "mean" | "weighted_mean"


@dataclass(frozen=True)
class IpoConfig(ObjectiveConfig):
    """IPO: (h − 1/(2β))² on summed log-probs (TRL's ``loss_type="ipo"`` uses score="mean")."""

    objective: ClassVar[str] = "ipo"

    beta: float = 0.1  # β (IPO's τ regulariser); 0.1 is TRL's default
    score: str = "sum"  # completion score: "sum" | "mean" | "weighted_mean"


@dataclass(frozen=True)
class CalDpoConfig(ObjectiveConfig):
    """Cal-DPO: −log σ(r_w − r_l) + (r_w − 1/(2β))² + (r_l + 1/(2β))², r = log-ratio to the reference."""

    objective: ClassVar[str] = "cal_dpo"

    beta: float = 0.1  # β: sets the calibration targets ±1/(2β) of the chosen / rejected log-ratios
    score: str = "sum"  # completion score: "sum" | "mean" | "weighted_mean"


@dataclass(frozen=True)
class DpoPositiveConfig(ObjectiveConfig):
    """DPO-Positive (DPOP): −log σ(β(h − λ_p·max(0, −r_w))), penalising a drop of the chosen log-ratio."""

    objective: ClassVar[str] = "dpo_positive"

    beta: float = 0.1  # β, as in DPO
    lambda_p: float = 1.0  # λ_p, weight of the chosen-likelihood penalty (SPEC §3)
    score: str = "sum"  # completion score: "sum" | "mean" | "weighted_mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "lambda_p", self.lambda_p >= 0, ">= 0")


@dataclass(frozen=True)
class SimpoConfig(ObjectiveConfig):
    """SimPO: −log σ(β(s̄_w − s̄_l) − γ) on length-averaged log-probs, no reference."""

    objective: ClassVar[str] = "simpo"
    needs_reference: ClassVar[bool] = False  # SimPO: length-averaged scores, no reference

    beta: float = 2.0  # β; 2.0 as in the SimPO paper (TRL's CPOConfig defaults to 0.1)
    gamma: float = 0.5  # γ, target reward margin (SPEC §3)
    score: str = "mean"  # completion score: "mean" (SimPO paper) | "sum" | "weighted_mean"


SFT_REDUCTIONS = ("token", "sequence")


@dataclass(frozen=True)
class SftConfig(ObjectiveConfig):
    """SFT: weighted negative log-likelihood of the target completions.

    reduction "token": L = Σ_i c_i Σ_t w_t(−ℓ_t) / Σ_i c_i Σ_t w_t, a token-weighted mean over the whole
    batch (with unit weights: the mean NLL per token, Hugging Face's causal-LM loss).
    reduction "sequence": L = Σ_i c_i [Σ_t w_t(−ℓ_t) / Σ_t w_t] / Σ_i c_i, each completion counted once.
    """

    objective: ClassVar[str] = "sft"
    needs_reference: ClassVar[bool] = False
    pairwise: ClassVar[bool] = False  # every completion is a target

    token_weighting: bool = True  # TW switch: role weights on the target's tokens (no diff: no rejected)
    reduction: str = "token"  # "token" | "sequence", see the class docstring

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice(self, "reduction", SFT_REDUCTIONS)


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


#: Every objective's config class by name; the losses (pvfast.objectives.losses) register their terms by the
#: same names.
OBJECTIVE_CONFIGS: Mapping[str, type[ObjectiveConfig]] = {
    cls.objective: cls
    for cls in (TabpoConfig, DpoConfig, IpoConfig, CalDpoConfig, DpoPositiveConfig, SimpoConfig, SftConfig)
}
#: The objectives of the preference stage (every pairwise one).
PREFERENCE_OBJECTIVES = tuple(name for name, cls in OBJECTIVE_CONFIGS.items() if cls.pairwise)


def objective_config_class(name: str) -> type[ObjectiveConfig]:
    """The config class of objective ``name``; KeyError naming the known ones otherwise."""
    if name not in OBJECTIVE_CONFIGS:
        raise KeyError(f"unknown objective {name!r}; known objectives: {sorted(OBJECTIVE_CONFIGS)}")
    return OBJECTIVE_CONFIGS[name]


def default_config(name: str) -> ObjectiveConfig:
    """The default config of objective ``name``."""
    return objective_config_class(name)()
