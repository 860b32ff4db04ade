"""Prefix-tree packing: shared prompt tokens run once, completions run as branches of one row.

Every PV-Miner example starts with the same ~3.5k-token instruction, then a ~55-token message, then a
chosen and up to three rejected completions of ~50–300 tokens. Run separately, a pair with three rejected
completions pays for the instruction four times. Here a micro-batch is a *token trie* over the full
sequences ``prompt_ids + completion`` of all its completions, flattened depth-first into one row of ``L``
tokens. Sharing comes from the data (equal token prefixes), never from assumptions: the instruction is
shared by every example of the pack, each message by its own completions, and chosen/rejected completions
also share their common start.

Attention follows the tree: token ``q`` attends token ``k`` iff ``k`` is ``q`` itself or an ancestor of
``q``. Position ids are tree depths (0-based), so every completion sees exactly the tokens and positions it
would see run alone, and its logits are those of the separate sequence (up to float summation order).

Layout, by example (``pack`` produces exactly this; ``tests/test_packing.py`` asserts it)::

    group A: prompt [10 11 20]  completions  A0 = [30 31] (chosen)   A1 = [30 32] (rejected)
    group B: prompt [10 11 21]  completions  B0 = [40]

    trie                      10 ─ 11 ─┬─ 20 ─ 30 ─┬─ 31
                                       │           └─ 32
                                       └─ 21 ─ 40

    index          0   1   2   3   4   5   6   7
    input_ids     10  11  20  30  31  32  21  40
    position_ids   0   1   2   3   4   4   2   3     depth in the trie
    node_ids       0   0   1   1   2   3   4   4     radix node (run of tokens stored together) of the token
    subtree_end    8   8   6   6   5   6   8   8     descendants of token i are indices (i, subtree_end[i])

    who attends to whom (row = query, x = may attend)
             kv  0  1  2  3  4  5  6  7
        q 0      x
        q 1      x  x
        q 2      x  x  x
        q 3      x  x  x  x
        q 4      x  x  x  x  x
        q 5      x  x  x  x  .  x                  32 does not see its sibling 31
        q 6      x  x  .  .  .  .  x               B's message does not see group A
        q 7      x  x  .  .  .  .  x  x

    scoring rows (one per completion token; hidden[score_positions] predicts score_targets)
        score_positions   2   3   2   3   6        the parent token of each completion token
        score_targets    30  31  30  32  40
        score_segments    0   0   1   1   2        completion index m within the pack
        score_roles, score_diff                    each scored token's role and diff flag (given by the groups)
        completion_sources  (0,0) (0,1) (1,0)      (item index, j-th completion of the group)

    tokens: 8 packed, 14 unshared (5 + 5 + 4)

Because the flattening is depth-first, the descendants of a token form one contiguous index range, so the
whole ancestor relation is one ``(L,)`` vector: ``attend[q, k] = (k <= q) & (q < subtree_end[k])``. The
same expression is the FlexAttention ``mask_mod`` (GPU: memory O(L) instead of the O(L²) boolean mask).

Scoring cannot be a per-position target array: the last prompt token is the parent of the first token of
k+1 different completions. So scoring is a list of gather rows (``score_*``, N = Σ completion lengths):
``log_softmax(hidden[score_positions] @ W.T)[score_targets]`` is each completion's per-token log-prob as if
it ran alone, in completion order, with ``score_segments`` the segment ids of :mod:`pvfast.objectives.stats`.

Packing (:func:`pack`) is first-fit-decreasing on the *marginal* cost of a group (the trie tokens it adds
to a pack; the shared instruction is paid once per pack), never exceeding the token budget. The result is
deterministic: groups are ordered by standalone cost, ties by input order, and each pack lists its groups in
input order. SFT uses the same packer with one completion per group.

Masks by attention implementation (chosen by :func:`pvfast.model.forward.packed_attention_mask`): pvfast's
tree attention (:mod:`pvfast.model.attention`, the CPU default) takes no mask at all, only ``subtree_end``, and
computes exactly the attended pairs; SDPA takes the (1, 1, L, L) boolean mask (True = attend; O(L²) memory and
compute); eager takes it as an additive float mask; FlexAttention takes a ``BlockMask`` built from
``subtree_end``, and skips the blocks where branches do not see each other. Padding tokens
(``pad_to_multiple``) are isolated roots: each attends only to itself, so no attention row is empty.

Sliding-window layers (``window=W``): key ``k`` is seen by query ``q`` iff it is an ancestor-or-self and
``depth(q) - depth(k) < W`` (depth = position id): the window counts positions along the token's own root path,
exactly as the unshared sequence sees it (transformers' ``kv_idx > q_idx - sliding_window``).

Usage, with the per-completion sums of :mod:`pvfast.objectives.stats` (the trainer does the same through the fused
op, see :mod:`pvfast.packing.loss_batch`)::

    batches = pack(groups, token_budget=16384)
    for batch in batches:
        batch = batch.to(device)
        logp = packed_token_logprobs(model, batch)                        # (N,)
        weights = token_weights(batch.score_roles, batch.score_diff, objective_config)   # the objective's
        stats = segment_stats_reference(logp, weights, batch.score_segments,
                                        batch.num_segments, objective_config.gate_tau)   # (M, NUM_STATS)

For preference pairs, give the chosen completion once *per pair*, each copy with that pair's diff flags
(``TokenizedPairGroup.chosen_diff_masks``): identical token ids share their trie nodes, so the model still
computes them once, and every pair is scored exactly as the released code scores it alone.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from pvfast.data.roles import ROLE_SCAFFOLD


@dataclass(frozen=True)
class CompletionGroup:
    """One prompt and its completions (SFT: one; preference: chosen first, then the rejected ones).

    Attributes:
        prompt_ids: token ids of the prompt (never scored); must be non-empty, its last token predicts the
            first completion token.
        completions: token ids of each completion (scored).
        roles: the role id (:mod:`pvfast.data.roles`) of every completion token (same lengths), or None for
            all scaffold.
        diffs: per completion token, whether it differs from the other side of its preference pair (SPEC §2,
            on a token alignment), or None for none. Token weights are not data: the objective turns roles
            and diff flags into weights (:mod:`pvfast.objectives.weights`), so its settings apply without
            packing again.
        key: caller's name for the group (e.g. a record id), used in errors and carried into the batch.
    """

    prompt_ids: Sequence[int]
    completions: Sequence[Sequence[int]]
    roles: Sequence[Sequence[int]] | None = None
    diffs: Sequence[Sequence[bool]] | None = None
    key: Hashable = None

    def validate(self, index: int) -> None:
        """Raise ValueError naming the group if its fields are inconsistent."""
        name = _group_name(self, index)
        if len(self.prompt_ids) == 0:
            raise ValueError(f"{name}: prompt_ids is empty; the last prompt token must predict the completion")
        if len(self.completions) == 0:
            raise ValueError(f"{name}: no completions")
        for what, values in (("role", self.roles), ("diff", self.diffs)):
            if values is None:
                continue
            if len(values) != len(self.completions):
                raise ValueError(f"{name}: {len(values)} {what} lists for {len(self.completions)} completions")
            for j, (c, v) in enumerate(zip(self.completions, values)):
                if len(c) != len(v):
                    raise ValueError(f"{name}: completion {j} has {len(c)} tokens but {len(v)} {what} flags")

    def truncated(self, cap: int) -> CompletionGroup:
        """The group with every completion (and its roles and diff flags) cut to at most ``cap`` tokens."""
        def cut(lists):
            return None if lists is None else [x[:cap] for x in lists]

        return CompletionGroup(self.prompt_ids, [c[:cap] for c in self.completions], cut(self.roles),
                               cut(self.diffs), self.key)

    def sequences(self) -> list[list[int]]:
        """Full token sequences ``prompt_ids + completion``, one per completion, as lists of Python ints."""
        prompt = _int_list(self.prompt_ids)
        return [prompt + _int_list(c) for c in self.completions]

    @property
    def unshared_tokens(self) -> int:
        """Tokens the group costs when every completion runs as its own sequence."""
        return sum(len(self.prompt_ids) + len(c) for c in self.completions)


def _int_list(ids) -> list[int]:
    """Python ints from a list, tuple, numpy array or tensor (the trie compares list slices, which needs
    plain ints to run at C speed)."""
    return ids.tolist() if hasattr(ids, "tolist") else [int(t) for t in ids]


def _group_name(group: CompletionGroup, index: int) -> str:
    return f"group {index}" + ("" if group.key is None else f" (key {group.key!r})")


@dataclass
class PackedBatch:
    """One packed row: a flattened token trie plus the gather rows that score its completions.

    Tensors (L = packed row length incl. padding, N = number of scored completion tokens, M = completions):
        input_ids:       (L,) int64 token ids in depth-first trie order.
        position_ids:    (L,) int64 depth of each token in the trie (0 for padding).
        node_ids:        (L,) int64 radix node of each token in depth-first order; -1 for padding.
        subtree_end:     (L,) int64 exclusive end of each token's descendants (i + 1 for padding).
        score_positions: (N,) int64 index of the token whose hidden state predicts each scored token.
        score_targets:   (N,) int64 the scored token ids.
        score_segments:  (N,) int64 completion index 0..M-1 of each scored token (completion order).
        score_roles:     (N,) int8 role id of each scored token (:mod:`pvfast.data.roles`; scaffold where the
                         group has no roles).
        score_diff:      (N,) bool, whether each scored token differs from its pair's other side.
    Metadata:
        completion_sources:  (item index in ``pack``'s input, j) per completion; j = 0 chosen, j >= 1 rejected.
        group_keys:      the group key of each completion (``CompletionGroup.key``).
        tree_tokens:     trie tokens (L without padding).
        unshared_tokens: Σ over completions of len(prompt) + len(completion).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    node_ids: torch.Tensor
    subtree_end: torch.Tensor
    score_positions: torch.Tensor
    score_targets: torch.Tensor
    score_segments: torch.Tensor
    score_roles: torch.Tensor
    score_diff: torch.Tensor
    completion_sources: tuple[tuple[int, int], ...]
    group_keys: tuple[Hashable, ...]
    tree_tokens: int
    unshared_tokens: int

    @property
    def num_tokens(self) -> int:
        """L, the row length the model runs (padding included)."""
        return int(self.input_ids.numel())

    @property
    def num_segments(self) -> int:
        """M, the number of completions."""
        return len(self.completion_sources)

    @property
    def num_scored(self) -> int:
        """N, the number of scored tokens."""
        return int(self.score_targets.numel())

    @property
    def savings(self) -> float:
        """Fraction of the unshared tokens that packing avoids: 1 - tree_tokens / unshared_tokens."""
        return 1.0 - self.tree_tokens / self.unshared_tokens

    @property
    def compression(self) -> float:
        """unshared_tokens / tree_tokens (>= 1): how many times fewer tokens the tree runs."""
        return self.unshared_tokens / self.tree_tokens

    def to(self, device: torch.device | str) -> PackedBatch:
        """A copy with every tensor on ``device``."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()}
        return PackedBatch(**moved)

    def attention_mask(self, window: int | None = None) -> torch.Tensor:
        """(1, 1, L, L) bool, True where query row q may attend key column k (k is q or its ancestor, and
        within ``window`` positions along the path when given)."""
        return tree_attention_mask(self.subtree_end, self.position_ids, window)[None, None]

    def block_mask(self, device: torch.device | str | None = None, window: int | None = None):
        """FlexAttention ``BlockMask`` of the same relation (B = H = 1 broadcast)."""
        from torch.nn.attention.flex_attention import create_block_mask

        subtree_end = self.subtree_end if device is None else self.subtree_end.to(device)
        depth = self.position_ids.to(subtree_end.device)
        length = self.num_tokens
        return create_block_mask(tree_mask_mod(subtree_end, depth, window), B=None, H=None, Q_LEN=length,
                                 KV_LEN=length, device=subtree_end.device)


def _check_window(window: int | None, position_ids: torch.Tensor | None) -> None:
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding window must be a positive int, got {window!r}")
    if position_ids is None:
        raise ValueError("a sliding window needs position_ids (the tree depths)")


def tree_attention_mask(subtree_end: torch.Tensor, position_ids: torch.Tensor | None = None,
                        window: int | None = None) -> torch.Tensor:
    """(L, L) bool ancestor-or-self relation from the depth-first ``subtree_end`` vector (L,); with ``window``,
    only keys fewer than ``window`` tree levels (``position_ids``) above the query."""
    _check_window(window, position_ids)
    idx = torch.arange(subtree_end.numel(), device=subtree_end.device)
    q, k = idx[:, None], idx[None, :]
    allowed = (k <= q) & (q < subtree_end[None, :])
    if window is not None:
        allowed &= (position_ids[:, None] - position_ids[None, :]) < window
    return allowed


def tree_mask_mod(subtree_end: torch.Tensor, position_ids: torch.Tensor | None = None, window: int | None = None):
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of the tree relation (``subtree_end``: (L,)); with
    ``window``, of the windowed relation (``position_ids``: (L,) tree depths)."""
    _check_window(window, position_ids)
    if window is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx < subtree_end[kv_idx])
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return ((kv_idx <= q_idx) & (q_idx < subtree_end[kv_idx])
                    & (position_ids[q_idx] - position_ids[kv_idx] < window))

    return mask_mod


class _RadixNode:
    """An unbranched run of trie tokens stored together (a radix-tree edge); children keyed by their first
    token, in insertion order (which is the depth-first order of the flattened row)."""

    __slots__ = ("tokens", "children", "start", "end")

    def __init__(self, tokens: list[int]):
        self.tokens = tokens
        self.children: dict[int, _RadixNode] = {}
        self.start = -1  # flat index of tokens[0], set by flattening
        self.end = -1  # exclusive flat end of the subtree, set by flattening


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two int lists.

    Slice comparisons run in C; bisecting on them costs O(n log n) C work instead of an O(n) Python loop
    (prompts are thousands of tokens and usually equal for most of their length).
    """
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class _RadixTree:
    """Token radix tree; the root holds no tokens. ``size`` = number of trie tokens (distinct prefixes)."""

    def __init__(self) -> None:
        self.root = _RadixNode([])
        self.size = 0

    def matched_prefix(self, seq: list[int]) -> int:
        """Length of the longest prefix of ``seq`` already in the tree."""
        node, pos = self.root, 0
        while pos < len(seq):
            child = node.children.get(seq[pos])
            if child is None:
                return pos
            n = len(child.tokens)
            # Whole-edge comparison runs in C; the token-by-token scan only on the edge where they part.
            if child.tokens == seq[pos:pos + n]:
                node, pos = child, pos + n
            else:
                return pos + _common_prefix_len(child.tokens, seq[pos:pos + n])
        return pos

    def insert(self, seq: list[int]) -> None:
        node, pos = self.root, 0
        while pos < len(seq):
            child = node.children.get(seq[pos])
            if child is None:
                node.children[seq[pos]] = _RadixNode(list(seq[pos:]))
                self.size += len(seq) - pos
                return
            n = _common_prefix_len(child.tokens, seq[pos:pos + len(child.tokens)])
            if n < len(child.tokens):
                # Split in place so the parent's child order (depth-first order) is unchanged.
                tail = _RadixNode(child.tokens[n:])
                tail.children = child.children
                child.tokens = child.tokens[:n]
                child.children = {tail.tokens[0]: tail}
            node, pos = child, pos + n

    def path_indices(self, seq: Sequence[int]) -> torch.Tensor:
        """(len(seq),) flat index of each token of an inserted ``seq`` (after :meth:`flatten`)."""
        node, pos, pieces = self.root, 0, []
        while pos < len(seq):
            node = node.children[seq[pos]]
            take = min(len(node.tokens), len(seq) - pos)  # a sequence may end inside a node
            pieces.append(torch.arange(node.start, node.start + take))
            pos += take
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)

    def flatten(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """Depth-first order: (input_ids, position_ids, node_ids, subtree_end) as lists of length size."""
        ids: list[int] = []
        pos: list[int] = []
        node_of: list[int] = []
        nodes: list[_RadixNode] = []
        # Iterative DFS (prompts are thousands of tokens deep in tokens, but few nodes deep; still no recursion).
        stack: list[tuple[_RadixNode, int, bool]] = [(c, 0, False) for c in reversed(self.root.children.values())]
        while stack:
            node, depth, done = stack.pop()
            if done:
                node.end = len(ids)
                continue
            node.start = len(ids)
            ids.extend(node.tokens)
            pos.extend(range(depth, depth + len(node.tokens)))
            node_of.extend([len(nodes)] * len(node.tokens))
            nodes.append(node)
            stack.append((node, depth, True))
            child_depth = depth + len(node.tokens)
            stack.extend((c, child_depth, False) for c in reversed(node.children.values()))
        end = [0] * len(ids)
        for node in nodes:
            end[node.start:node.start + len(node.tokens)] = [node.end] * len(node.tokens)
        return ids, pos, node_of, end


def _own_shared_prefix(sequences: list[list[int]]) -> list[int]:
    """For each sequence, its longest common prefix with any earlier sequence of the same group."""
    return [max((_common_prefix_len(s, sequences[i]) for i in range(j)), default=0) for j, s in enumerate(sequences)]


def _marginal_cost(tree: _RadixTree, prompt: list[int], seqs: list[list[int]], own_prefix: list[int]) -> int:
    """Trie tokens a group would add to ``tree``.

    A sequence adds the tokens past its longest prefix already present, in the pack or earlier in its own
    group (both prefix sets are prefix-closed, so the union is the longer of the two). All sequences start
    with the prompt, so when the pack does not hold the whole prompt every sequence matches exactly as far
    as the prompt does: one walk instead of one per completion.
    """
    in_tree = tree.matched_prefix(prompt)
    if in_tree < len(prompt):
        return sum(len(x) - max(in_tree, k) for x, k in zip(seqs, own_prefix))
    return sum(len(x) - max(tree.matched_prefix(x), k) for x, k in zip(seqs, own_prefix))


def group_tree_tokens(group: CompletionGroup) -> int:
    """Trie tokens the group costs alone (its completions share the prompt and common starts)."""
    seqs = group.sequences()
    return sum(len(s) - k for s, k in zip(seqs, _own_shared_prefix(seqs)))


def build_packed_batch(
    groups: Sequence[CompletionGroup],
    item_indices: Sequence[int] | None = None,
    pad_to_multiple: int = 1,
    pad_id: int = 0,
) -> PackedBatch:
    """Pack ``groups`` into one row, in the given order (see the module docstring for the layout).

    Args:
        groups: the groups of the row; completion m follows group order, then completion order.
        item_indices: index of each group in the caller's item list (for ``completion_sources``); default 0..G-1.
        pad_to_multiple: pad L up to a multiple of this (fixed shapes for compiled kernels). Padding tokens
            are isolated roots: each attends only to itself (no all-masked rows), nothing attends to them.
        pad_id: token id written into padding positions.
    """
    if item_indices is None:
        item_indices = range(len(groups))
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    tree = _RadixTree()
    for index, group in zip(item_indices, groups):
        group.validate(index)
        for seq in group.sequences():
            tree.insert(seq)
    ids, pos, node_of, end = tree.flatten()
    tree_tokens = len(ids)
    pad = -tree_tokens % pad_to_multiple
    ids += [pad_id] * pad
    pos += [0] * pad
    node_of += [-1] * pad
    end += list(range(tree_tokens + 1, tree_tokens + pad + 1))

    positions, targets, segments, roles, diffs = [], [], [], [], []
    sources, keys = [], []
    for index, group in zip(item_indices, groups):
        p = len(group.prompt_ids)
        for j, seq in enumerate(group.sequences()):
            m = len(sources)
            path = tree.path_indices(seq)
            positions.append(path[p - 1:-1])  # token t of the completion is predicted by its parent
            targets.append(torch.tensor(seq[p:], dtype=torch.int64))
            segments.append(torch.full((len(seq) - p,), m, dtype=torch.int64))
            n = len(seq) - p
            roles.append(torch.as_tensor(group.roles[j] if group.roles is not None else [ROLE_SCAFFOLD] * n,
                                         dtype=torch.int8))
            diffs.append(torch.as_tensor(group.diffs[j] if group.diffs is not None else [False] * n,
                                         dtype=torch.bool))
            sources.append((int(index), j))
            keys.append(group.key)
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        position_ids=torch.tensor(pos, dtype=torch.int64),
        node_ids=torch.tensor(node_of, dtype=torch.int64),
        subtree_end=torch.tensor(end, dtype=torch.int64),
        score_positions=torch.cat(positions).to(torch.int64),
        score_targets=torch.cat(targets),
        score_segments=torch.cat(segments),
        score_roles=torch.cat(roles),
        score_diff=torch.cat(diffs),
        completion_sources=tuple(sources),
        group_keys=tuple(keys),
        tree_tokens=tree_tokens,
        unshared_tokens=sum(g.unshared_tokens for g in groups),
    )


def assign_packs(items: Sequence[CompletionGroup], token_budget: int) -> list[list[int]]:
    """First-fit-decreasing assignment of item indices to packs by marginal trie cost.

    Items are visited by standalone cost, largest first (ties: input order); each goes into the first open
    pack whose trie grows by at most the remaining budget, else opens a new pack. Returns each pack's item
    indices in input order, packs in the order they were opened.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    seqs, own_prefix, costs = [], [], []
    for i, group in enumerate(items):
        group.validate(i)
        s = group.sequences()
        own = _own_shared_prefix(s)
        cost = sum(len(x) - k for x, k in zip(s, own))
        if cost > token_budget:
            raise ValueError(f"{_group_name(group, i)} needs {cost} tokens on its own but token_budget is "
                             f"{token_budget}; truncate it or raise the budget")
        seqs.append(s)
        own_prefix.append(own)
        costs.append(cost)
    order = sorted(range(len(items)), key=lambda i: (-costs[i], i))
    trees: list[_RadixTree] = []
    members: list[list[int]] = []
    for i in order:
        prompt = _int_list(items[i].prompt_ids)
        for tree, member in zip(trees, members):
            if tree.size + costs[i] <= token_budget:
                fits = True  # fits even with nothing shared: skip the walk
            else:
                fits = tree.size + _marginal_cost(tree, prompt, seqs[i], own_prefix[i]) <= token_budget
            if fits:
                for x in seqs[i]:
                    tree.insert(x)
                member.append(i)
                break
        else:
            tree = _RadixTree()
            for x in seqs[i]:
                tree.insert(x)
            trees.append(tree)
            members.append([i])
    return [sorted(m) for m in members]


def pack(
    items: Sequence[CompletionGroup],
    token_budget: int,
    pad_to_multiple: int = 1,
    pad_id: int = 0,
) -> list[PackedBatch]:
    """Pack groups into rows of at most ``token_budget`` tokens (padding included) by first-fit-decreasing.

    Raises ValueError naming the group when one group alone needs more than the budget (truncation is the
    caller's decision) or when the budget is not a multiple of ``pad_to_multiple``.
    """
    if token_budget % pad_to_multiple:
        raise ValueError(f"token_budget {token_budget} is not a multiple of pad_to_multiple {pad_to_multiple}")
    return [
        build_packed_batch([items[i] for i in member], member, pad_to_multiple=pad_to_multiple, pad_id=pad_id)
        for member in assign_packs(items, token_budget)
    ]
