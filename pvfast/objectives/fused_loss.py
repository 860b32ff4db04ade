"""``FusedTokenPOLoss``: any pvfast objective straight from hidden states, never materialising logits.

The module runs the fused-linear op (``pvfast.ops.dispatch.linear_segment_stats``: lm_head matmul, online
log-sum-exp, target gather and the per-completion sums in one pass) and then the objective in
``pvfast.objectives.losses`` on the (M, 7) statistics. Numerically it is the torch reference: same statistics,
same objective code; only the way ℓ_t is computed differs.

Inputs are *scoring rows*: one row per scored completion token t, holding the hidden state that predicts
it (for a causal LM, the state of the token before t), its target id, its role and diff flag (SPEC §2) and
its completion (segment) index. The module turns roles and diff flags into token weights with its own
config (:mod:`pvfast.objectives.weights`), so a batch never carries weights of another setting.
:func:`causal_lm_rows` turns the usual padded (B, T) layout with ``-100`` labels into scoring rows; the
prefix-tree packer produces them directly.

Use in a plain loop (complete and tested: ``examples/fused_loss_hf_loop.py``)::

    loss_fn = FusedTokenPOLoss("tabpo")                               # released preset
    base = peft_model.get_base_model()
    hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state   # (B, T, H), no logits
    rows = causal_lm_rows(hidden, labels, token_roles, token_diff)    # labels: -100 off the completion
    ref_stats = ...  # loss_fn.statistics(rows of the same batch, adapters disabled, no_grad)
    out = loss_fn(rows, base.lm_head.weight, pairs=PairIndex(chosen_rows, rejected_rows), ref_stats=ref_stats)
    out.loss.backward(); out.metrics["reward_accuracy"]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pvfast.data.roles import ROLE_SCAFFOLD
from pvfast.objectives.config import ObjectiveConfig
from pvfast.objectives.losses import ObjectiveOutput, PairIndex, compute_objective, objective_spec
from pvfast.objectives.stats import IGNORE_INDEX
from pvfast.objectives.weights import token_weights
from pvfast.ops import dispatch as ops


@dataclass
class ScoringRows:
    """Scored completion tokens of a batch, one row each (N rows, M completions).

    hidden: (N, H) hidden state that predicts each token; targets: (N,) token ids; roles: (N,) int role ids
    (:mod:`pvfast.data.roles`); diff: (N,) bool, the token differs from the other side of its pair (SPEC §2),
    or None; segment_ids: (N,) completion index in [0, M); num_segments: M; segment_records: the record id
    of each of the M completions (what class-balance weights are looked up by), or None.
    """

    hidden: torch.Tensor
    targets: torch.Tensor
    roles: torch.Tensor
    diff: torch.Tensor | None
    segment_ids: torch.Tensor
    num_segments: int
    segment_records: Sequence[str] | None = None


def causal_lm_rows(hidden: torch.Tensor, labels: torch.Tensor, roles: torch.Tensor | None = None,
                   diff: torch.Tensor | None = None, segment_records: Sequence[str] | None = None,
                   ignore_index: int = IGNORE_INDEX) -> ScoringRows:
    """Scoring rows from a padded causal-LM batch: completion b is row b, position t predicts t+1.

    Args:
        hidden: (B, T, H) final hidden states (after the model's last norm, before lm_head).
        labels: (B, T) token ids of the completion, ``ignore_index`` at prompt and padding positions.
        roles: (B, T) role ids aligned with ``labels`` (:class:`pvfast.packing.padded.PaddedPairBatch`
            holds them), or None for all scaffold.
        diff: (B, T) bool diff flags aligned with ``labels``, or None for none.
        segment_records: the record id of each of the B rows (``PaddedPairBatch.segment_records``), what
            class-balance weights are looked up by; None without class balance.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"causal_lm_rows: hidden (B, T, H) and labels (B, T) expected, got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    for name, value in (("roles", roles), ("diff", diff)):
        if value is not None and value.shape != labels.shape:
            raise ValueError(f"causal_lm_rows: {name} {tuple(value.shape)} must match labels {tuple(labels.shape)}")
    if roles is None:
        roles = torch.full(labels.shape, ROLE_SCAFFOLD, dtype=torch.int8, device=labels.device)
    shifted = labels[:, 1:]
    keep = shifted != ignore_index  # (B, T-1): positions whose next token is scored
    batch_index = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(shifted)
    if segment_records is not None and len(segment_records) != labels.shape[0]:
        raise ValueError(f"causal_lm_rows: {len(segment_records)} segment_records for {labels.shape[0]} rows")
    return ScoringRows(hidden=hidden[:, :-1][keep], targets=shifted[keep], roles=roles[:, 1:][keep],
                       diff=None if diff is None else diff[:, 1:][keep], segment_ids=batch_index[keep],
                       num_segments=labels.shape[0],
                       segment_records=None if segment_records is None else tuple(segment_records))


class FusedTokenPOLoss(nn.Module):
    """Loss and metrics of a pvfast objective from scoring rows and the lm_head weight.

    Args:
        objective: "tabpo" (default), "dpo", "ipo", "cal_dpo", "dpo_positive", "simpo" or "sft".
        config: the objective's config (``pvfast.objectives.config``), e.g. ``TabpoConfig.from_preset("paper")``;
            None gives its defaults (the released preset for TAB-PO).
        impl: kernel backend of ``pvfast.ops``: "auto" (CUDA → Triton, CPU → C++), "triton", "cpp", "torch".
        class_weights: class-balance weight c_i by record id (:func:`pvfast.objectives.class_balance.
            class_balance_table`, None when class balance is off); looked up through
            ``ScoringRows.segment_records`` when ``forward`` gets no explicit ``example_weights``.

    ``forward(rows, lm_head_weight, pairs, ref_stats, example_weights, softcap) -> ObjectiveOutput``:
        rows: :class:`ScoringRows` (N scored tokens of M completions); lm_head_weight: (V, H), frozen
        under LoRA (a trainable one gets its gradient too); pairs: :class:`pvfast.objectives.losses.PairIndex`
        over the M completions (None for SFT over every completion); ref_stats: (M, 7) reference statistics
        from :meth:`statistics` on the frozen model (None for reference-free objectives); example_weights:
        (P,) per-pair (SFT: per-target) example weights, overriding ``class_weights``; softcap: the model's
        final-logit soft-capping (Gemma 2), None when it has none.
    """

    def __init__(self, objective: str = "tabpo", config: ObjectiveConfig | None = None, impl: str = "auto",
                 class_weights: Mapping[str, float] | None = None):
        super().__init__()
        spec = objective_spec(objective)
        self.objective = objective
        self.config = spec.config_cls() if config is None else config
        if not isinstance(self.config, spec.config_cls):
            raise TypeError(f"objective {objective!r} takes a {spec.config_cls.__name__}, "
                            f"got {type(self.config).__name__}")
        self.needs_reference = spec.needs_reference
        self.impl = impl
        if class_weights is not None and not self.config.class_balance.enabled:
            raise ValueError("class_weights were given but class balance is off in the config "
                             "(class_balance.enabled)")
        self.class_weights = class_weights

    def statistics(self, rows: ScoringRows, lm_head_weight: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
        """(M, 7) per-completion statistics of ``rows`` under this objective's token weights and gate."""
        weights = token_weights(rows.roles, rows.diff, self.config)
        hidden, weight = rows.hidden, lm_head_weight
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # Under autocast the lm_head runs in the autocast dtype, as F.linear would; the op itself then runs
            # with autocast off so its internal fp32 accumulation is not cast down again.
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return ops.linear_segment_stats(hidden, weight, rows.targets, weights, rows.segment_ids,
                                            rows.num_segments, self.config.gate_tau, impl=self.impl,
                                            softcap=softcap)

    def example_weights(self, rows: ScoringRows, pairs: PairIndex | None) -> torch.Tensor | None:
        """Class-balance weights c of the loss's units (pairs; SFT: target completions) from ``class_weights``
        and the rows' record ids; None when class balance is off."""
        if not self.config.class_balance.enabled:
            return None
        if self.class_weights is None:
            raise ValueError("class balance is enabled in the config but the loss has no class_weights: build it "
                             "with FusedTokenPOLoss(..., class_weights=class_balance_table(ids, annotations, "
                             "config.class_balance)) or pass example_weights to forward")
        if rows.segment_records is None:
            raise ValueError("class balance is on (class_weights given) but the scoring rows carry no "
                             "segment_records to look the weights up by")
        units = range(rows.num_segments) if pairs is None else pairs.chosen.tolist()
        missing = sorted({rows.segment_records[m] for m in units} - set(self.class_weights))
        if missing:
            raise KeyError(f"no class-balance weight for record(s) {missing[:3]}: the table was computed on "
                           f"other records")
        return torch.tensor([self.class_weights[rows.segment_records[m]] for m in units], dtype=torch.float32)

    def forward(self, rows: ScoringRows, lm_head_weight: torch.Tensor, pairs: PairIndex | None = None,
                ref_stats: torch.Tensor | None = None, example_weights: torch.Tensor | None = None,
                softcap: float | None = None) -> ObjectiveOutput:
        stats = self.statistics(rows, lm_head_weight, softcap)
        if example_weights is None:
            example_weights = self.example_weights(rows, pairs)
        return compute_objective(self.objective, stats, ref_stats, pairs, example_weights, self.config)

    def extra_repr(self) -> str:
        balance = "" if self.class_weights is None else f", class_weights={len(self.class_weights)} records"
        return f"objective={self.objective!r}, impl={self.impl!r}, config={self.config}{balance}"
