"""Data records → tree-packed, loss-ready batches (``LossBatch``) for the trainer.

Pipeline::

    records ──preference_groups / sft_groups──▶ groups ──make_loss_batches──▶ LossBatch per packed row
             tokenize, roles and diff flags,     one CompletionGroup per       pack by token budget,
             budget check or truncation          record (key: GroupKey)        pairs, record ids

Segment layout of a preference record
-------------------------------------
The released training code scores every (chosen, rejected_j) pair on its own, and the chosen completion's
diff flags depend on which rejected completion it is aligned with. For exact parity a record with k
rejected completions becomes one group whose completions are, in this order::

    completion j   0            1            2            3            ...  2k-2          2k-1
                   chosen@1     rejected_1   chosen@2     rejected_2   ...  chosen@k      rejected_k
    diff flags     c vs r_1     r_1 vs c     c vs r_2     r_2 vs c     ...  c vs r_k      r_k vs c

so pair i (0-based) of the record is (completion 2i, completion 2i+1). The k copies of the chosen tokens
are one path in the token trie (equal sequences share every node), so the transformer still runs them once;
only their k scoring rows (the lm_head matmul over the chosen tokens) repeat, each with its pair's diff
flags. Inside a packed row, segment m is the m-th completion in group order, so a ``LossBatch``'s ``pairs``
are (m, m+1) for every even completion index of each group. Every completion carries its record id
(``segment_records``): the objective looks class-balance weights up by it, so the k pairs of a record share
its c_i. Batches hold no weights at all: token weights (from roles and diff flags) and example weights are
the objective's (:mod:`pvfast.objectives.weights`, :mod:`pvfast.objectives.class_balance`).

SFT: one group per example, one completion (the canonical JSON of the gold annotations plus the
end-of-turn token), roles without diff flags; ``pairs`` is None (every completion is a target).

Over-long groups
----------------
A group whose trie (prompt once, completions as branches) needs more tokens than the token budget is an
error naming the record id and its prompt and completion lengths. With ``truncate=True`` the completion
*tails* are cut instead: every completion of the group is cut to the same longest length that fits (the
largest cap ``n`` with cost(completions[:n]) <= budget, found by bisection), so equal chosen copies stay
equal and chosen/rejected are cut alike. The prompt is never truncated (a prompt that leaves no room for
one completion token is still an error). A truncated completion loses its end-of-turn token, so the model
is not trained to stop on that record.

Epoch order: packs are built once, deterministically; :func:`epoch_order` shuffles pack indices per epoch
as a pure function of (seed, epoch), so a run resumes at (epoch, cursor) with ``epoch_order(...)[cursor:]``.

Usage (the trainer's step, :func:`pvfast.train.loop.accumulate_step`, does this with DDP and precision)::

    groups = preference_groups(records, tokenizer, token_budget=16384)
    batches = make_loss_batches(groups, 16384, "po")
    log(PackingStats.from_batches(batches, 16384).as_dict())
    for index in epoch_order(len(batches), seed, epoch)[cursor:]:
        batch = batches[index].to(device)
        mask = packed_attention_mask(model, batch.packed)                 # shared by both passes
        ref = reference_stats(model, batch, loss_fn, mask)               # or cache.get(batch, loss_fn)
        rows = batch.scoring_rows(packed_forward(model, batch.packed, mask))
        out = loss_fn(rows, lm_head_weight(model, allow_softcap=True), batch.pairs, ref,
                      softcap=final_logit_softcap(model))
        out.loss_sum.backward()                                           # a step divides by Σ out.normalizer
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pvfast.data.jsonfmt import serialize
from pvfast.data.prompt import PromptTemplate, build_prompt
from pvfast.data.records import Example, PreferenceRecord
from pvfast.data.tokenization import tokenize_completion, tokenize_pair_group
from pvfast.objectives.fused_loss import ScoringRows
from pvfast.objectives.losses import PairIndex
from pvfast.packing.tree import CompletionGroup, PackedBatch, group_tree_tokens, pack

KINDS = ("po", "sft")  # preference optimization (chosen/rejected pairs) | supervised fine-tuning


@dataclass(frozen=True)
class GroupKey:
    """What a group carries into its batch: the record it came from and its kind.

    ``repr`` is the record id only, so packing errors read "group 3 (key record 'syn-000017') ...".
    """

    record_id: str
    kind: str  # "po": completions are [chosen@1, rejected_1, ...]; "sft": every completion is a target

    def __repr__(self) -> str:
        return f"record {self.record_id!r}"


# --------------------------------------------------------------------------------------------------
# Records → groups
# --------------------------------------------------------------------------------------------------


def _prompt_text(tokenizer, record: PreferenceRecord, template: PromptTemplate | None) -> str:
    """The record's ready prompt (TRL layout, already chat-formatted), else the prompt builder's."""
    if record.prompt is not None:
        return record.prompt
    return build_prompt(tokenizer, record.direction, record.message, template)


def fit_to_budget(group: CompletionGroup, token_budget: int | None, truncate: bool = False) -> CompletionGroup:
    """The group itself if its trie fits ``token_budget`` (None: no limit), else truncated or an error.

    Raises ValueError naming the record id, the prompt length and the completion lengths when the group
    does not fit and ``truncate`` is False, or when even one token per completion does not fit after the
    prompt (the prompt is never truncated). See the module docstring for the truncation rule.
    """
    if token_budget is None:
        return group
    cost = group_tree_tokens(group)
    if cost <= token_budget:
        return group
    lengths = [len(c) for c in group.completions]
    what = (f"{repr(group.key) if group.key is not None else 'group'}: prompt {len(group.prompt_ids)} tokens, "
            f"completions {_describe_lengths(group.key, lengths)} need {cost} tree tokens but token_budget is "
            f"{token_budget}")
    if not truncate:
        raise ValueError(f"{what}; raise the budget or truncate completion tails (truncate=True)")
    if group_tree_tokens(group.truncated(1)) > token_budget:
        raise ValueError(f"{what}; the prompt leaves no room for the completions and is never truncated")
    lo, hi = 1, max(lengths)  # cost(cap=lo) fits, cost(cap=hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if group_tree_tokens(group.truncated(mid)) <= token_budget:
            lo = mid
        else:
            hi = mid
    return group.truncated(lo)


def _describe_lengths(key, lengths: list[int]) -> str:
    """Completion lengths in words: chosen/rejected for a preference group, a plain list otherwise."""
    if isinstance(key, GroupKey) and key.kind == "po":
        return f"chosen {lengths[0]} tokens, rejected {lengths[1::2]} tokens"
    return f"{lengths} tokens"


def preference_groups(
    records: Sequence[PreferenceRecord],
    tokenizer,
    template: PromptTemplate | None = None,
    *,
    token_budget: int | None = None,
    truncate: bool = False,
    end_of_turn: str | None = None,
) -> list[CompletionGroup]:
    """One group per record: completions [chosen@1, rejected_1, ..., chosen@k, rejected_k] (module docstring).

    Args:
        records: preference records; the prompt is ``record.prompt`` when set (a ready, chat-formatted text),
            else ``build_prompt(tokenizer, direction, message, template)``.
        tokenizer: a fast tokenizer with a chat template.
        template: user-prompt template (None: pvfast's default instruction template).
        token_budget: the packing budget; a record whose trie exceeds it is an error (see :func:`fit_to_budget`).
        truncate: cut completion tails of over-long records instead of raising.
        end_of_turn: the token ending an assistant turn (None: the tokenizer's EOS).
    Returns:
        groups in record order, each with its tokens' roles and diff flags; ``key`` is a :class:`GroupKey`
        with ``kind="po"``.
    """
    groups = []
    for record in records:
        tokenized = tokenize_pair_group(tokenizer, _prompt_text(tokenizer, record, template), record.chosen,
                                        record.rejected, end_of_turn)
        completions, roles, diffs = [], [], []
        for j, rejected in enumerate(tokenized.rejected):
            completions += [tokenized.chosen.completion_ids, rejected.completion_ids]
            roles += [tokenized.chosen.roles, rejected.roles]
            diffs += [tokenized.chosen_diff_masks[j], tokenized.rejected_diff_masks[j]]
        group = CompletionGroup(tokenized.prompt_ids, completions, roles, diffs, GroupKey(record.id, "po"))
        groups.append(fit_to_budget(group, token_budget, truncate))
    return groups


def sft_groups(
    examples: Sequence[Example],
    tokenizer,
    template: PromptTemplate | None = None,
    *,
    token_budget: int | None = None,
    truncate: bool = False,
    end_of_turn: str | None = None,
) -> list[CompletionGroup]:
    """One group per example: the prompt and one completion, ``serialize(annotations)`` + end-of-turn.

    The completion's tokens carry their roles and no diff flags (there is no rejected completion). Other
    arguments as in :func:`preference_groups`.
    """
    groups = []
    for example in examples:
        prompt = build_prompt(tokenizer, example.direction, example.message, template)
        tokenized = tokenize_completion(tokenizer, prompt, serialize(example.annotations), end_of_turn)
        group = CompletionGroup(tokenized.prompt_ids, [tokenized.completion_ids], [tokenized.roles], None,
                                GroupKey(example.id, "sft"))
        groups.append(fit_to_budget(group, token_budget, truncate))
    return groups


# --------------------------------------------------------------------------------------------------
# Groups → loss batches
# --------------------------------------------------------------------------------------------------


@dataclass
class LossBatch:
    """One packed row with everything the objective needs.

    packed: the :class:`PackedBatch` (L tokens, N scored rows, M completions).
    pairs: (P,) chosen/rejected segment rows of each pair (kind "po"); None for "sft" (every segment is a
        target).
    kind: "po" or "sft".
    Token and example weights are not here: the objective makes them from the packed row's roles and diff
    flags and from each segment's record id (``segment_records``).
    """

    packed: PackedBatch
    pairs: PairIndex | None
    kind: str
    content_key: str | None = field(default=None, compare=False)  # set by pvfast.model.reference.batch_key

    @property
    def num_pairs(self) -> int:
        """P (0 for SFT)."""
        return 0 if self.pairs is None else self.pairs.num_pairs

    @property
    def segment_records(self) -> tuple[str, ...]:
        """The record id of each of the M segments (completions)."""
        return tuple(k.record_id if isinstance(k, GroupKey) else str(k) for k in self.packed.group_keys)

    @property
    def record_ids(self) -> tuple[str, ...]:
        """Ids of the records in the row, in segment order, each once."""
        return tuple(dict.fromkeys(self.segment_records))

    def scoring_rows(self, hidden: torch.Tensor) -> ScoringRows:
        """Scoring rows of this row's completions from the decoder's last hidden states ``hidden`` (L, H).

        Row t holds ``hidden[score_positions[t]]`` (N, H), the state that predicts ``score_targets[t]``.
        """
        if hidden.dim() != 2 or hidden.shape[0] != self.packed.num_tokens:
            raise ValueError(f"scoring_rows: expected hidden of shape ({self.packed.num_tokens}, H), "
                             f"got {tuple(hidden.shape)}")
        packed = self.packed
        # index_select, not hidden[positions]: a tree gathers branch points several times, and the backward of
        # advanced indexing on the CPU adds repeated rows with parallel atomics (order set by thread
        # scheduling, so PO was not bitwise reproducible); index_select's backward (index_add_) adds in order.
        return ScoringRows(hidden=hidden.index_select(0, packed.score_positions), targets=packed.score_targets,
                           roles=packed.score_roles, diff=packed.score_diff, segment_ids=packed.score_segments,
                           num_segments=packed.num_segments, segment_records=self.segment_records)

    def to(self, device: torch.device | str) -> LossBatch:
        """A copy with the packed row on ``device``. ``pairs`` stay on the CPU: ``compute_objective`` checks
        their bounds there (a check on a GPU would synchronise) and moves them."""
        return LossBatch(self.packed.to(device), self.pairs, self.kind, self.content_key)


def _group_kind(group: CompletionGroup) -> str | None:
    return group.key.kind if isinstance(group.key, GroupKey) else None


def _check_groups(groups: Sequence[CompletionGroup], kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for i, group in enumerate(groups):
        group_kind = _group_kind(group)
        if group_kind is not None and group_kind != kind:
            raise ValueError(f"group {i} ({group.key!r}) was built for kind {group_kind!r}, "
                             f"not {kind!r}")
        if kind == "po" and (len(group.completions) < 2 or len(group.completions) % 2):
            raise ValueError(f"group {i} ({group.key!r}) has {len(group.completions)} completions; a preference "
                             "group needs [chosen@1, rejected_1, ..., chosen@k, rejected_k] (an even number)")


def _loss_batch(packed: PackedBatch, kind: str) -> LossBatch:
    """The pairs of one packed row, read from its ``completion_sources`` (item, j)."""
    if kind == "sft":
        return LossBatch(packed, None, kind)
    chosen, rejected = [], []
    for m, (_, j) in enumerate(packed.completion_sources):
        if j % 2 == 0:  # chosen@(j/2 + 1); its rejected is the next completion of the same group
            chosen.append(m)
            rejected.append(m + 1)
    pairs = PairIndex(torch.tensor(chosen, dtype=torch.int64), torch.tensor(rejected, dtype=torch.int64))
    return LossBatch(packed, pairs, kind)


def make_loss_batches(
    groups: Sequence[CompletionGroup],
    token_budget: int,
    kind: str = "po",
    *,
    pad_to_multiple: int = 1,
    pad_id: int = 0,
) -> list[LossBatch]:
    """Pack ``groups`` into rows of at most ``token_budget`` tokens and attach the pairs.

    Packing is :func:`pvfast.packing.tree.pack` (first-fit-decreasing on marginal trie cost): deterministic,
    each row lists its groups in input order. kind "po" expects groups from :func:`preference_groups`
    (or any groups laid out [chosen, rejected] per pair), "sft" from :func:`sft_groups`.
    """
    _check_groups(groups, kind)
    packed = pack(groups, token_budget, pad_to_multiple=pad_to_multiple, pad_id=pad_id)
    return [_loss_batch(p, kind) for p in packed]


def epoch_order(num_batches: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch ``epoch`` visits the ``num_batches`` packs: a permutation that depends only
    on (seed, epoch), so a resumed run continues at its cursor with ``epoch_order(n, seed, epoch)[cursor:]``.
    """
    if num_batches < 0:
        raise ValueError(f"num_batches must be >= 0, got {num_batches}")
    order = list(range(num_batches))
    # A string seed is hashed with SHA-512 by random.Random: stable across runs, platforms and
    # PYTHONHASHSEED, and independent streams for neighbouring (seed, epoch) values.
    random.Random(f"pvfast-epoch-order:{seed}:{epoch}").shuffle(order)
    return order


# --------------------------------------------------------------------------------------------------
# Packing statistics (for logging)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackingStats:
    """Token counts of a list of loss batches.

    ``unshared_tokens`` is what the published layout runs: every completion (each chosen copy of a pair
    included) as its own full sequence prompt + completion.
    """

    batches: int
    token_budget: int
    tree_tokens: int  # trie tokens the model runs (padding excluded)
    row_tokens: int  # tokens the model runs, padding included
    unshared_tokens: int  # Σ over completions of len(prompt) + len(completion)
    scored_tokens: int  # completion tokens scored (lm_head rows)
    completions: int
    pairs: int

    @classmethod
    def from_batches(cls, batches: Sequence[LossBatch], token_budget: int) -> PackingStats:
        return cls(
            batches=len(batches),
            token_budget=token_budget,
            tree_tokens=sum(b.packed.tree_tokens for b in batches),
            row_tokens=sum(b.packed.num_tokens for b in batches),
            unshared_tokens=sum(b.packed.unshared_tokens for b in batches),
            scored_tokens=sum(b.packed.num_scored for b in batches),
            completions=sum(b.packed.num_segments for b in batches),
            pairs=sum(b.num_pairs for b in batches),
        )

    @property
    def compression(self) -> float:
        """unshared_tokens / tree_tokens: how many times fewer tokens the packed rows run."""
        return self.unshared_tokens / max(self.tree_tokens, 1)

    @property
    def savings(self) -> float:
        """1 - tree_tokens / unshared_tokens: the fraction of unshared tokens never computed."""
        return 1.0 - self.tree_tokens / max(self.unshared_tokens, 1)

    @property
    def fill(self) -> float:
        """tree_tokens / (batches · token_budget): how full the rows are."""
        return self.tree_tokens / max(self.batches * self.token_budget, 1)

    def as_dict(self) -> dict[str, float]:
        """Counts and ratios, for a metrics log."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out.update(compression=self.compression, savings=self.savings, fill=self.fill)
        return out
