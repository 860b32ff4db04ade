"""Padded (unshared) batches of preference pairs, for using pvfast's loss inside other trainers.

pvfast's own trainer packs prompts as a tree (``pvfast.packing.tree``). Other trainers usually feed padded
rows; this collator lays tokenized pair groups out that way, one row per completion:

    row 0: prompt | chosen (diff flags of pair 1)      row 1: prompt | rejected 1
    row 2: prompt | chosen (diff flags of pair 2)      row 3: prompt | rejected 2   ...

The chosen completion gets one row per pair because the released training code scores every
(chosen, rejected_j) pair on its own: the chosen's diff flags (and so its weights) depend on which rejected
it is compared with. ``labels`` hold the completion tokens and ``-100`` elsewhere; ``token_roles`` and
``token_diff`` say what each label token is, so :func:`pvfast.causal_lm_rows` turns the model's hidden
states into scoring rows whose weights the loss makes from its own config; ``pairs`` indexes the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pvfast.data.roles import ROLE_PROMPT
from pvfast.data.tokenization import TokenizedPairGroup
from pvfast.objectives.losses import PairIndex
from pvfast.objectives.stats import IGNORE_INDEX


@dataclass
class PaddedPairBatch:
    """B = 2·P rows of length T (right padding).

    input_ids, attention_mask, labels: (B, T) int64; token_roles: (B, T) int8 (ROLE_PROMPT off the
    completion); token_diff: (B, T) bool; pairs: PairIndex over the rows; segment_records: the record id of
    each row (what class-balance weights are looked up by), or None when no ids were given.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    token_roles: torch.Tensor
    token_diff: torch.Tensor
    pairs: PairIndex
    segment_records: tuple[str, ...] | None = None


def collate_pair_groups(groups: Sequence[TokenizedPairGroup], pad_id: int,
                        record_ids: Sequence[str] | None = None) -> PaddedPairBatch:
    """Lay ``groups`` out as padded rows (module docstring); ``record_ids`` names each group's record."""
    if not groups:
        raise ValueError("collate_pair_groups: no groups")
    if record_ids is not None and len(record_ids) != len(groups):
        raise ValueError(f"collate_pair_groups: {len(record_ids)} record ids for {len(groups)} groups")
    rows, records = [], []
    for g, group in enumerate(groups):
        for j, rejected in enumerate(group.rejected):
            rows.append((group.chosen, group.chosen_diff_masks[j]))
            rows.append((rejected, group.rejected_diff_masks[j]))
            if record_ids is not None:
                records += [str(record_ids[g])] * 2
    length = max(len(c.prompt_ids) + len(c.completion_ids) for c, _ in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    token_roles = torch.full(shape, ROLE_PROMPT, dtype=torch.int8)
    token_diff = torch.zeros(shape, dtype=torch.bool)
    for b, (completion, diff) in enumerate(rows):
        p, n = len(completion.prompt_ids), len(completion.prompt_ids) + len(completion.completion_ids)
        input_ids[b, :n] = torch.as_tensor(completion.input_ids)
        attention_mask[b, :n] = 1
        labels[b, p:n] = torch.as_tensor(completion.completion_ids)
        token_roles[b, p:n] = torch.as_tensor(completion.roles)
        token_diff[b, p:n] = torch.as_tensor(diff)
    pairs = PairIndex(torch.arange(0, len(rows), 2), torch.arange(1, len(rows), 2))
    return PaddedPairBatch(input_ids, attention_mask, labels, token_roles, token_diff, pairs,
                           None if record_ids is None else tuple(records))
