"""The stage configs of ``python -m pvfast.train``: one frozen dataclass per stage, composed of sections.

Every constant is a field whose default is documented inline::

    SFTStageConfig       model  data  optim  run  sft
    POStageConfig        model  data  optim  run  pairs  po   sft_adapter
    PipelineStageConfig  model  data  optim  run  sft  pairs  po          (SFT -> pairs -> PO -> evaluation)

The sections are :mod:`pvfast.config.sections` (model, data, optim, run, pairs) and the two objective
sections below. The objective settings are the classes of :mod:`pvfast.objectives.config` (``TabpoConfig``,
``DpoConfig``, ..., ``SftConfig``), nested as they are: ``po.objective`` names the objective and
``po.objective_config`` is that objective's config, started from its defaults or, for TAB-PO, from the
preset named by ``po.preset`` ("released", "paper", "paper_b085"). :class:`POSection` declares this
dependency (``config_restarts``) for the override engine: changing ``po.objective`` or ``po.preset`` in a
layer restarts ``po.objective_config`` before that layer's ``po.objective_config.*`` keys apply.

How a stage config is resolved from presets, files and the command line: :mod:`pvfast.config.trainer`.
This module imports no library code (no torch): only other config modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Union

from pvfast.config.checks import field_error, require_choice
from pvfast.config.sections import DataConfig, ModelConfig, OptimConfig, PairConfig, RunConfig
from pvfast.objectives.config import OBJECTIVE_CONFIGS, PREFERENCE_OBJECTIVES, ObjectiveConfig, SftConfig, TabpoConfig
from pvfast.objectives.config import PRESETS as TABPO_PRESETS
from pvfast.objectives.config import default_config as default_objective_config

STAGES = ("sft", "po", "pipeline")
DEFAULT_STAGE = "pipeline"


# --------------------------------------------------------------------------------------------------
# Objective sections
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTSection:
    """The SFT stage's objective: weighted NLL of the gold completion (SPEC §3)."""

    objective_config: SftConfig = SftConfig()  # token weighting on by default; reduction "token"

    def __post_init__(self) -> None:
        if not isinstance(self.objective_config, SftConfig):
            raise field_error(self, "objective_config",
                              f"must be an SftConfig, got {type(self.objective_config).__name__}")


@dataclass(frozen=True)
class POSection:
    """The preference stage's objective (SPEC §3) and its reference."""

    #: For the override engine (pvfast.config.overrides): when a layer changes a source field, the target
    #: field starts over from :meth:`restart_field` before the layer's own keys for it apply. In order: a
    #: TAB-PO preset does not carry over to another objective; a new objective or preset restarts its config.
    config_restarts: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "preset": ("objective",),
        "objective_config": ("objective", "preset"),
    }

    objective: str = "tabpo"  # one of PREFERENCE_OBJECTIVES: tabpo dpo ipo cal_dpo dpo_positive simpo
    preset: str | None = None  # TAB-PO only: "released" | "paper" | "paper_b085"; None = TabpoConfig defaults
    # The objective's config (TabpoConfig, DpoConfig, ...): defaults of ``objective`` or its ``preset``.
    objective_config: ObjectiveConfig = TabpoConfig()
    # Score every completion with the reference once before training and cache it on disk (no reference
    # forward per step); False = the reference runs each step (adapters disabled, no grad).
    precompute_ref: bool = False

    def __post_init__(self) -> None:
        require_choice(self, "objective", PREFERENCE_OBJECTIVES)
        require_choice(self, "preset", sorted(TABPO_PRESETS), allow_none=True)
        if self.preset is not None and self.objective != "tabpo":
            raise field_error(self, "preset", f"names a TAB-PO preset; objective is {self.objective!r}")
        expected = OBJECTIVE_CONFIGS[self.objective]
        if type(self.objective_config) is not expected:
            raise field_error(self, "objective_config", f"objective {self.objective!r} takes {expected.__name__}, "
                                                        f"got {type(self.objective_config).__name__}")

    @classmethod
    def restart_field(cls, name: str, values: Mapping[str, Any]) -> Any:
        """The value field ``name`` starts over from, given the section's new ``values`` (see config_restarts)."""
        if name == "preset":
            return values["preset"] if values["objective"] == "tabpo" else None
        if name == "objective_config":
            return cls.initial_objective_config(values["objective"], values["preset"])
        raise KeyError(name)

    @staticmethod
    def initial_objective_config(objective: str, preset: str | None) -> ObjectiveConfig:
        """The objective config a section starts from: the TAB-PO preset, else the objective's defaults."""
        if preset is not None and objective == "tabpo" and preset in TABPO_PRESETS:
            return TabpoConfig.from_preset(preset)
        if objective in OBJECTIVE_CONFIGS:
            return default_objective_config(objective)
        return TabpoConfig()  # an unknown objective: __post_init__ names it


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTStageConfig:
    """``python -m pvfast.train sft``: supervised fine-tuning on the gold completions."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    sft: SFTSection = SFTSection()


@dataclass(frozen=True)
class POStageConfig:
    """``python -m pvfast.train po``: preference optimization from an SFT adapter."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    pairs: PairConfig = PairConfig()  # used when data.train holds examples rather than preference records
    po: POSection = POSection()
    # PEFT adapter directory of the SFT model PO starts from (the reference is that model, SPEC §3);
    # None = start from the base model itself.
    sft_adapter: str | None = None


@dataclass(frozen=True)
class PipelineStageConfig:
    """``python -m pvfast.train pipeline``: SFT -> confusion-aware pairs (SPEC §4) -> PO -> evaluation."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()  # the same recipe for both training stages, as published (SPEC §6)
    run: RunConfig = RunConfig()  # each stage writes under run.output_dir/<stage>
    sft: SFTSection = SFTSection()
    pairs: PairConfig = PairConfig()
    po: POSection = POSection()


StageConfig = Union[SFTStageConfig, POStageConfig, PipelineStageConfig]
STAGE_CONFIGS: Mapping[str, type] = {"sft": SFTStageConfig, "po": POStageConfig, "pipeline": PipelineStageConfig}


def stage_of(cfg: StageConfig) -> str:
    """The stage name of a stage config."""
    for stage, cls in STAGE_CONFIGS.items():
        if type(cfg) is cls:
            return stage
    raise TypeError(f"not a stage config: {type(cfg).__name__}")
