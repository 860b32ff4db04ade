"""Padded (unshared) batches of preference pairs, for using pvfast's loss inside other trainers.

pvfast's own trainer packs prompts as a tree (``pvfast.packing.tree``). Other trainers usually feed padded
rows; this collator lays tokenized pair groups out that way, one row per completion:

    row 0: prompt | chosen (weights of pair 1)      row 1: prompt | rejected 1
    row 2: prompt | chosen (weights of pair 2)      row 3: prompt | rejected 2   ...

The chosen completion gets one row per pair because the released training code scores every
(chosen, rejected_j) pair on its own: the chosen's diff weights depend on which rejected it is compared
with. ``labels`` hold the completion tokens and ``-100`` elsewhere, so :func:`pvfast.causal_lm_rows`
turns the model's hidden states into scoring rows; ``pairs`` indexes the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pvfast.data.tokenization import TokenizedPairGroup
from pvfast.objectives.losses import PairIndex

IGNORE_INDEX = -100


@dataclass
class PaddedPairBatch:
    """B = 2·P rows of length T (right padding).

    input_ids, attention_mask, labels: (B, T) int64; token_weights: (B, T) float32 (0 off the completion);
    pairs: PairIndex over the rows; example_weights: (P,) float32 (class balance, 1 when unused).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    token_weights: torch.Tensor
    pairs: PairIndex
    example_weights: torch.Tensor


def collate_pair_groups(groups: Sequence[TokenizedPairGroup], pad_id: int,
                        example_weights: Sequence[float] | None = None) -> PaddedPairBatch:
    """Lay ``groups`` out as padded rows (module docstring); ``example_weights`` is one value per group."""
    if not groups:
        raise ValueError("collate_pair_groups: no groups")
    if example_weights is not None and len(example_weights) != len(groups):
        raise ValueError(f"collate_pair_groups: {len(example_weights)} example weights for {len(groups)} groups")
    rows, pair_weights = [], []
    for g, group in enumerate(groups):
        for j, rejected in enumerate(group.rejected):
            rows.append((group.chosen.input_ids, len(group.prompt_ids), group.chosen_pair_weights[j]))
            rows.append((rejected.input_ids, len(rejected.prompt_ids), rejected.weights))
            pair_weights.append(1.0 if example_weights is None else float(example_weights[g]))
    length = max(len(ids) for ids, _, _ in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    token_weights = torch.zeros(shape, dtype=torch.float32)
    for b, (ids, n_prompt, weights) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = torch.as_tensor(ids)
        attention_mask[b, :n] = 1
        labels[b, n_prompt:n] = torch.as_tensor(ids[n_prompt:])
        token_weights[b, n_prompt:n] = torch.as_tensor(weights)
    pairs = PairIndex(torch.arange(0, len(rows), 2), torch.arange(1, len(rows), 2))
    return PaddedPairBatch(input_ids, attention_mask, labels, token_weights, pairs,
                           torch.tensor(pair_weights, dtype=torch.float32))
