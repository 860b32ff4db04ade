"""``FusedTokenPOLoss``: any pvfast objective straight from hidden states, never materialising logits.

The module runs the fused-linear op (``pvfast.ops.dispatch.linear_segment_stats``: lm_head matmul, online
log-sum-exp, target gather and the per-completion sums in one pass) and then the objective in
``pvfast.objectives.losses`` on the (M, 7) statistics. Numerically it is the torch reference: same statistics, same
objective code; only the way ℓ_t is computed differs.

Inputs are *scoring rows*: one row per scored completion token t, holding the hidden state that predicts
it (for a causal LM, the state of the token before t), its target id, its weight w_t and its completion
(segment) index. :func:`causal_lm_rows` turns the usual padded (B, T) layout with ``-100`` labels into
scoring rows; the prefix-tree packer produces them directly.

Use in a plain loop (complete and tested: ``examples/fused_loss_hf_loop.py``)::

    loss_fn = FusedTokenPOLoss("tabpo")                               # released preset
    base = peft_model.get_base_model()
    hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state   # (B, T, H), no logits
    rows = causal_lm_rows(hidden, labels, token_weights)              # labels: -100 off the completion
    ref_stats = ...  # loss_fn.statistics(rows of the same batch, adapters disabled, no_grad)
    out = loss_fn(rows, base.lm_head.weight, pairs=PairIndex(chosen_rows, rejected_rows), ref_stats=ref_stats)
    out.loss.backward(); out.metrics["reward_accuracy"]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pvfast.objectives.config import ObjectiveConfig
from pvfast.objectives.losses import (
    ObjectiveOutput,
    PairIndex,
    compute_objective,
    effective_token_weights,
    objective_spec,
)
from pvfast.ops import dispatch as ops

IGNORE_INDEX = -100


@dataclass
class ScoringRows:
    """Scored completion tokens of a batch, one row each (N rows, M completions).

    hidden: (N, H) hidden state that predicts each token; targets: (N,) token ids; weights: (N,) token
    weights w_t; segment_ids: (N,) completion index in [0, M); num_segments: M.
    """

    hidden: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    segment_ids: torch.Tensor
    num_segments: int


def causal_lm_rows(hidden: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor | None = None,
                   ignore_index: int = IGNORE_INDEX) -> ScoringRows:
    """Scoring rows from a padded causal-LM batch: completion b is row b, position t predicts t+1.

    Args:
        hidden: (B, T, H) final hidden states (after the model's last norm, before lm_head).
        labels: (B, T) token ids of the completion, ``ignore_index`` at prompt and padding positions.
        token_weights: (B, T) weights aligned with ``labels`` (ones if None).
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"causal_lm_rows: hidden (B, T, H) and labels (B, T) expected, got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    if token_weights is None:
        token_weights = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    elif token_weights.shape != labels.shape:
        raise ValueError(f"causal_lm_rows: token_weights {tuple(token_weights.shape)} must match labels "
                         f"{tuple(labels.shape)}")
    shifted = labels[:, 1:]
    keep = shifted != ignore_index  # (B, T-1): positions whose next token is scored
    batch_index = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(shifted)
    return ScoringRows(hidden=hidden[:, :-1][keep], targets=shifted[keep],
                       weights=token_weights[:, 1:][keep].float(), segment_ids=batch_index[keep],
                       num_segments=labels.shape[0])


class FusedTokenPOLoss(nn.Module):
    """Loss and metrics of a pvfast objective from scoring rows and the lm_head weight.

    Args:
        objective: "tabpo" (default), "dpo", "ipo", "cal_dpo", "dpo_positive", "simpo" or "sft".
        config: the objective's config (``pvfast.objectives.losses``), e.g. ``TabpoConfig.from_preset("paper")``;
            None gives its defaults (the released preset for TAB-PO).
        impl: kernel backend of ``pvfast.ops.dispatch``: "auto" (CUDA → Triton, CPU → C++), "triton", "cpp", "torch".

    ``forward(rows, lm_head_weight, pairs, ref_stats, example_weights) -> ObjectiveOutput``:
        rows: :class:`ScoringRows` (N scored tokens of M completions); lm_head_weight: (V, H), frozen
        under LoRA (a trainable one gets its gradient too); pairs: :class:`pvfast.objectives.losses.PairIndex` over
        the M completions (None for SFT over every completion); ref_stats: (M, 7) reference statistics
        from :meth:`statistics` on the frozen model (None for reference-free objectives);
        example_weights: (P,) class-balance weights, used when the config enables class balance.
    """

    def __init__(self, objective: str = "tabpo", config: ObjectiveConfig | None = None, impl: str = "auto"):
        super().__init__()
        spec = objective_spec(objective)
        self.objective = objective
        self.config = spec.config_cls() if config is None else config
        if not isinstance(self.config, spec.config_cls):
            raise TypeError(f"objective {objective!r} takes a {spec.config_cls.__name__}, "
                            f"got {type(self.config).__name__}")
        self.needs_reference = spec.needs_reference
        self.impl = impl
        # Only TAB-PO gates; other objectives never read the gated columns, any threshold serves them.
        self.tau = getattr(self.config, "tau", 1.0)

    def statistics(self, rows: ScoringRows, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """(M, 7) per-completion statistics of ``rows`` under this objective's token weights and gate."""
        weights = effective_token_weights(rows.weights, self.config)
        hidden, weight = rows.hidden, lm_head_weight
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # Under autocast the lm_head runs in the autocast dtype, as F.linear would; the op itself then runs
            # with autocast off so its internal fp32 accumulation is not cast down again.
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return ops.linear_segment_stats(hidden, weight, rows.targets, weights, rows.segment_ids,
                                            rows.num_segments, self.tau, impl=self.impl)

    def forward(self, rows: ScoringRows, lm_head_weight: torch.Tensor, pairs: PairIndex | None = None,
                ref_stats: torch.Tensor | None = None,
                example_weights: torch.Tensor | None = None) -> ObjectiveOutput:
        stats = self.statistics(rows, lm_head_weight)
        return compute_objective(self.objective, stats, ref_stats, pairs, example_weights, self.config)

    def extra_repr(self) -> str:
        return f"objective={self.objective!r}, impl={self.impl!r}, config={self.config}"
