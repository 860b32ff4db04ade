"""Tree attention whose cost follows the tree: the ``pvfast_tree`` attention implementation for Hugging Face models.

A packed row (:mod:`pvfast.packing.tree`) handed to SDPA as a dense (L, L) mask costs all L² scores, although a
PV-Miner tree (one ~3.5k-token instruction, many short branches) attends to about a third of them. This module
computes exactly the pairs the tree attends, as a handful of dense attention calls on contiguous slices.

Decomposition
-------------
The row is cut into *chains*: maximal runs ``[a, b)`` of tokens where each token is the only child of the one
before and all share the same ``subtree_end`` ``e`` (a radix-tree node, read off ``subtree_end`` alone, so the
plan is exactly the relation of :func:`pvfast.packing.tree.tree_attention_mask`). A key ``k`` in a chain is
seen by the queries ``q >= k`` of the chain itself and by every query of the chain's descendants ``[b, e)``.
So every attended (query, key) pair lies in exactly one of two parts per chain, both plain slices of the row::

    causal part       queries [a, b)  x keys [a, b)    causal (the kernel skips the blocks above the diagonal)
    descendant part   queries [b, e)  x keys [a, b)    dense, no mask

    the docstring tree of pvfast.packing.tree:  chains [0,2) [2,4) [4,5) [5,6) [6,8)
             kv  0  1 | 2  3 | 4 | 5 | 6  7
        q 0      c    |      |   |   |             c: causal part of the chain
        q 1      c  c |      |   |   |             d: descendant part of the chain
        q 2      d  d | c    |   |   |
        q 3      d  d | c  c |   |   |
        q 4      d  d | d  d | c |   |
        q 5      d  d | d  d |   | c |
        q 6      d  d |      |   |   | c
        q 7      d  d |      |   |   | c  c

Each part gives its rows a partial softmax (output and log-sum-exp); the partial results of a row are merged
with the usual online-softmax rule. The backward pass gives each part the *merged* output and log-sum-exp, so
its probabilities are the row's true attention weights restricted to its keys: the part's query, key and
value gradients are exact and add up (the split-KV rule of FlashAttention-2 / ring attention). On the CPU the
parts run through PyTorch's fused flash kernel (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its
backward, the kernel behind ``F.scaled_dot_product_attention``), grouped-query heads folded into the query
length so keys and values are never repeated for the dense parts.

A chain longer than :data:`MAX_CHAIN` (the shared instruction) is cut into pieces: each piece is a causal part
plus a dense part over the chain's earlier pieces (the flash backward runs dense rectangles faster than long
causal triangles); its descendants still take one dense part over the whole chain (:func:`parts_of`).

Cost: the computed pairs are exactly the tree's (plus the diagonal blocks of the causal parts): at an 8k budget
with the ~3.5k-token instruction, 35 % of L². The plan (about two kernel calls per chain) is built once per row
and reused by every layer and pass (reference, policy, gradient-checkpointing recompute). Measured on 2 CPU
cores (bench/results/tree_attention_layer-cpu.md): one attention layer forward+backward 3.3x faster than SDPA
with the dense mask.

The same parts give FlexAttention its block-sparse ``BlockMask`` without evaluating the L² mask
(:func:`tree_block_mask`), the GPU path.

Sliding windows (Mistral, Qwen2/3 ``use_sliding_window``, Gemma 2/3 local layers): the model passes the layer's
window as ``sliding_window``; a key is then seen iff it is an ancestor-or-self and ``depth(q) - depth(k) <
window`` (transformers' convention, ``kv_idx > q_idx - sliding_window``), with depth = position id along the
token's own root path, as an unshared sequence sees it. Parts the window leaves whole run unmasked, parts it
empties are skipped, the others take an additive mask built once per (row, window).

How it plugs in
---------------
``pvfast_tree`` is registered with transformers' ``AttentionInterface`` (so any HF decoder whose attention goes
through it takes it: ``from_pretrained(..., attn_implementation="pvfast_tree")`` or
``model.set_attn_implementation("pvfast_tree")``) and with ``AttentionMaskInterface``. A call that carries a
:class:`TreeAttentionPlan` (``pvfast_tree_plan=`` keyword, passed by :func:`pvfast.model.forward.packed_forward`;
transformers forwards it to every attention layer, gradient-checkpointing recompute included) runs the tree;
any other call (generation, evaluation) is plain SDPA, with SDPA's own masks.

Refused with an error naming the feature (never computed silently wrong): attention logit soft-capping
(Gemma 2: use eager attention), attention dropout in training, attention sinks, position biases, a batch of
more than one row, non-causal attention, devices other than the CPU (use ``flex_attention`` there), a layer
whose window the model and its config disagree on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TREE_ATTENTION = "pvfast_tree"  # the attention implementation name registered with transformers
PLAN_KWARG = "pvfast_tree_plan"  # the keyword that carries the plan through the decoder to every layer
_ROW_FLAG = "_pvfast_tree_row"  # marks the (1, L) all-True padding mask a tree call passes (no mask is built)


@dataclass(frozen=True)
class Part:
    """Queries ``[q0, q1)`` attend keys ``[k0, k1)``; causal parts have q0 == k0 and q1 == k1.

    ``fresh``: no earlier part of the plan wrote these rows (the forward copies instead of merging).
    """

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool
    fresh: bool = False

    @property
    def pairs(self) -> int:
        n, m = self.q1 - self.q0, self.k1 - self.k0
        return n * (n + 1) // 2 if self.causal else n * m


# Longest causal part: a long chain (the shared instruction) is cut into pieces of at most this many tokens;
# piece i is a causal part plus a dense part over the chain's earlier pieces. The flash kernel's backward skips
# little of a causal part's upper triangle, dense rectangles it runs at full speed. Measured on 2 CPU threads
# (a 3,449-token chain, 9 heads, head dim 64, forward + backward): 3449 -> 2.34 s, 1024 -> 2.17 s, 512 -> 1.99 s,
# 256 -> 2.55 s (more, smaller calls).
MAX_CHAIN = 512


def chains(subtree_end: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(a, b, e)`` per chain in row order: tokens ``[a, b)``, descendants ``[b, e)`` (see the module docstring).

    Token i continues the chain of token i-1 iff it is i-1's only child: ``i < subtree_end[i-1]`` (a descendant,
    hence the first child in depth-first order) and ``subtree_end[i] == subtree_end[i-1]`` (nothing else below).
    """
    end = subtree_end.detach().to("cpu", torch.int64)
    length = end.numel()
    if length == 0:
        return []
    idx = torch.arange(1, length)
    same = (idx < end[:-1]) & (end[1:] == end[:-1])
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), idx[~same]]).tolist()
    stops = starts[1:] + [length]
    ends = end[torch.tensor(starts)].tolist()
    return list(zip(starts, stops, ends))


def parts_of(chain_list: list[tuple[int, int, int]], max_chain: int = MAX_CHAIN) -> list[Part]:
    """The parts of every chain, every attended pair in exactly one part::

        chain [a, b), pieces a = p0 < p1 < ... < pm = b of at most max_chain tokens:
            piece i        queries [p_i, p_i+1) x keys [p_i, p_i+1)   causal
            piece i > 0    queries [p_i, p_i+1) x keys [a, p_i)       dense (the chain's earlier pieces)
            descendants    queries [b, e)       x keys [a, b)         dense
    """
    if max_chain < 1:
        raise ValueError(f"max_chain must be >= 1, got {max_chain}")
    parts = []
    reach = 0  # rows written so far end here (descendant parts write ahead of the chains they cover)
    for a, b, e in chain_list:
        fresh_chain = a >= reach
        for p in range(a, b, max_chain):
            q = min(p + max_chain, b)
            parts.append(Part(p, q, p, q, True, fresh=fresh_chain))
            if p > a:
                parts.append(Part(p, q, a, p, False))
        if b < e:
            parts.append(Part(b, e, a, b, False, fresh=b >= reach))
        reach = max(reach, e)
    return parts


class TreeAttentionPlan:
    """The parts of one packed row, built once and used by every layer and pass over the row.

    Args:
        subtree_end: (L,) int64 exclusive end of each token's descendants (``PackedBatch.subtree_end``).
        position_ids: (L,) int64 tree depth of each token (``PackedBatch.position_ids``), for sliding windows.
        max_chain: longest chain piece (:data:`MAX_CHAIN`).
    """

    def __init__(self, subtree_end: torch.Tensor, position_ids: torch.Tensor, max_chain: int = MAX_CHAIN):
        if subtree_end.ndim != 1 or position_ids.shape != subtree_end.shape:
            raise ValueError(f"TreeAttentionPlan: subtree_end {tuple(subtree_end.shape)} and position_ids "
                             f"{tuple(position_ids.shape)} must be equal (L,) vectors")
        self.length = int(subtree_end.numel())
        self.device = subtree_end.device
        self.layer_windows: list[int | None] | None = None  # per layer, from the config (checked per call)
        self.calls = 0  # attention calls that ran the plan (packed_forward checks every layer did)
        self.parts = parts_of(chains(subtree_end), max_chain)
        self.depth = position_ids.detach().to("cpu", torch.int64)
        # (1, L) all-True padding mask: transformers builds no mask for it (see _tree_or_sdpa_mask).
        self.row_mask = torch.ones((1, self.length), dtype=torch.bool, device=self.device)
        setattr(self.row_mask, _ROW_FLAG, True)
        self._windowed: dict[tuple[int, torch.dtype], list[tuple[Part, torch.Tensor | None, torch.Tensor | None]]]
        self._windowed = {}

    @classmethod
    def from_batch(cls, batch) -> TreeAttentionPlan:
        """The plan of a :class:`pvfast.packing.tree.PackedBatch`."""
        return cls(batch.subtree_end, batch.position_ids)

    @property
    def pairs(self) -> int:
        """(query, key) pairs the plan computes (causal parts count their lower triangle)."""
        return sum(p.pairs for p in self.parts)

    def windowed_parts(self, window: int, dtype: torch.dtype):
        """``(part, additive mask or None, rows with no visible key or None)`` for a sliding window.

        Parts with no visible pair are dropped; parts the window leaves whole keep no mask (causal ones keep
        the kernel's causal flag). Cached per (window, dtype).
        """
        key = (int(window), dtype)
        if key not in self._windowed:
            self._windowed[key] = [w for p in self.parts if (w := self._window_part(p, int(window), dtype))]
        return self._windowed[key]

    def _window_part(self, part: Part, window: int, dtype: torch.dtype):
        dq = self.depth[part.q0:part.q1]
        dk = self.depth[part.k0:part.k1]  # a chain: consecutive depths
        # Largest and smallest depth distance in the part (causal: within the chain, 0 .. n-1).
        far = int(dq.max() - dk.min())
        near = 0 if part.causal else int(dq.min() - dk.max())
        if near >= window:
            return None
        if far < window:
            return part, None, None
        allowed = (dq[:, None] - dk[None, :]) < window
        if part.causal:
            allowed &= torch.ones_like(allowed).tril()
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf")).to(self.device)
        empty = ~allowed.any(1)
        return part, mask, (empty.to(self.device) if bool(empty.any()) else None)


# --------------------------------------------------------------------------------- FlexAttention block masks
def tree_block_mask(plan: TreeAttentionPlan, subtree_end: torch.Tensor, block_size: int = 128):
    """FlexAttention ``BlockMask`` of the tree, built from the plan's parts in O(parts + blocks²) on the host.

    ``create_block_mask`` evaluates the mask function on every one of the L² (query, key) pairs (on the GPU, an
    L x L intermediate: gigabytes at 16k tokens). The plan's parts tile exactly the attended pairs, so the
    number of attended pairs in each (block_size x block_size) tile is a sum of rectangle and triangle overlaps:
    a tile with none is skipped, a tile whose pairs are all attended is "full" (no mask function call), the rest
    are "partial" (``mask_mod`` = :func:`pvfast.packing.tree.tree_mask_mod`). Same relation as
    ``PackedBatch.block_mask()``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    from pvfast.packing.tree import tree_mask_mod

    length = plan.length
    blocks = -(-length // block_size)
    starts = torch.arange(blocks, dtype=torch.int64) * block_size
    stops = (starts + block_size).clamp(max=length)

    def overlap(lo: int, hi: int) -> torch.Tensor:  # tokens of [lo, hi) in each block
        return (stops.clamp(max=hi) - starts.clamp(min=lo)).clamp(min=0)

    counts = torch.zeros(blocks, blocks, dtype=torch.int64)
    for part in plan.parts:
        if not part.causal:
            counts += overlap(part.q0, part.q1)[:, None] * overlap(part.k0, part.k1)[None, :]
            continue
        rows = torch.arange(part.q0, part.q1)  # query q sees keys [q0, q] of the chain piece
        per_row = ((stops[None, :].clamp(max=rows[:, None] + 1) - starts[None, :].clamp(min=part.q0))
                   .clamp(min=0))
        counts.index_add_(0, rows // block_size, per_row)
    # A tile is full only at the whole block size: like create_block_mask, the ragged last row/column of tiles
    # (L not a multiple of block_size) stays partial, so the kernel masks its out-of-range positions.
    full = counts == block_size * block_size
    partial = (counts > 0) & ~full

    def indices(selected: torch.Tensor):
        number = selected.sum(1).to(torch.int32)
        # Selected block columns first (stable), the rest after: the first `number` entries are the blocks.
        order = torch.sort((~selected).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
        return number[None, None].contiguous(), order[None, None].contiguous()

    device = subtree_end.device
    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(full)
    return BlockMask.from_kv_blocks(kv_num.to(device), kv_idx.to(device), full_num.to(device), full_idx.to(device),
                                    BLOCK_SIZE=block_size, mask_mod=tree_mask_mod(subtree_end),
                                    seq_lengths=(length, length))


# ------------------------------------------------------------------------------------------------ the kernel
def _flash_cpu(q, k, v, causal, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                       scale=scale)


def _flash_cpu_backward(dout, q, k, v, out, lse, causal, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal,
                                                                                attn_mask=mask, scale=scale)


def _fold(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(1, H, n, ...) -> (1, KV, G*n, ...): grouped query heads become extra query rows of their key head."""
    shape = x.shape
    return x.reshape(1, kv_heads, (shape[1] // kv_heads) * shape[2], *shape[3:])


def _repeat(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(1, KV, n, D) -> (1, KV*G, n, D) in transformers' ``repeat_kv`` order (head h uses key head h // G)."""
    if groups == 1:
        return x
    b, kv, n, d = x.shape
    return x[:, :, None].expand(b, kv, groups, n, d).reshape(b, kv * groups, n, d)


def _unrepeat(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Gradient of :func:`_repeat`: sum over each key head's query-head group."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x.reshape(b, h // groups, groups, n, d).sum(2)


def _part_views(part: Part, mask, q, k, v, groups: int):
    """The kernel's (q, k, v) for a part, whether GQA is folded into the query rows, and its sizes."""
    qs = q[:, :, part.q0:part.q1]
    ks, vs = k[:, :, part.k0:part.k1], v[:, :, part.k0:part.k1]
    fold = groups > 1 and not part.causal and mask is None  # causal/masked rows need their own query index
    if fold:
        return _fold(qs, k.shape[1]), ks, vs, True
    return qs, _repeat(ks, groups), _repeat(vs, groups), False


class _TreeAttention(torch.autograd.Function):
    """Attention over a tree plan.

    Shapes: query (1, H, L, D), key/value (1, KV, L, D) with H % KV == 0 -> output (1, H, L, D).
    Forward: each part's flash output and log-sum-exp, merged per row (fp32). Backward: each part's flash
    backward with the merged output and log-sum-exp (nothing recomputed beyond what the flash backward does).
    """

    @staticmethod
    def forward(ctx, query, key, value, parts, scale):
        heads, kv_heads = query.shape[1], key.shape[1]
        groups = heads // kv_heads
        length, dim = query.shape[2], query.shape[3]
        out = torch.zeros((1, heads, length, dim), dtype=torch.float32, device=query.device)
        lse = torch.full((1, heads, length), float("-inf"), dtype=torch.float32, device=query.device)
        for part, mask, empty in parts:
            q, k, v, folded = _part_views(part, mask, query, key, value, groups)
            o, m = _flash_cpu(q, k, v, part.causal and mask is None, mask, scale)
            if folded:
                o, m = o.reshape(1, heads, -1, dim), m.reshape(1, heads, -1)
            if empty is not None:  # rows the window leaves without a key: the kernel reports lse 0, not -inf
                m = m.masked_fill(empty, float("-inf"))
            rows = slice(part.q0, part.q1)
            acc, old = out[:, :, rows], lse[:, :, rows]
            if part.fresh and empty is None:
                acc.copy_(o)
                old.copy_(m)
                continue
            # Online-softmax merge: (acc, old) and (o, m) -> weights exp(old - new), exp(m - new).
            new = torch.logaddexp(old, m)
            if empty is not None or part.fresh:  # a row may have no key yet on either side: weight 0, no NaN
                new_safe = new.masked_fill(torch.isinf(new), 0.0)
            else:
                new_safe = new
            acc.mul_((old - new_safe).exp_().unsqueeze(-1))
            acc.add_(o.float().mul_((m - new_safe).exp_().unsqueeze(-1)))
            old.copy_(new)
        out = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.parts, ctx.scale = parts, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        query, key, value, out, lse = ctx.saved_tensors
        heads, kv_heads = query.shape[1], key.shape[1]
        groups = heads // kv_heads
        dim = query.shape[3]
        dout = dout.to(query.dtype)
        dq = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
        dk = torch.zeros(key.shape, dtype=torch.float32, device=key.device)
        dv = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        for part, mask, _empty in ctx.parts:
            q, k, v, folded = _part_views(part, mask, query, key, value, groups)
            rows = slice(part.q0, part.q1)
            o, m, g = out[:, :, rows], lse[:, :, rows], dout[:, :, rows]
            if folded:
                o, m, g = _fold(o, kv_heads), _fold(m, kv_heads), _fold(g, kv_heads)
            gq, gk, gv = _flash_cpu_backward(g, q, k, v, o, m, part.causal and mask is None, mask, ctx.scale)
            if folded:
                gq = gq.reshape(1, heads, -1, dim)
            else:
                gk, gv = _unrepeat(gk, groups), _unrepeat(gv, groups)
            dq[:, :, rows] += gq
            dk[:, :, part.k0:part.k1] += gk
            dv[:, :, part.k0:part.k1] += gv
        return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), None, None


def tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: TreeAttentionPlan,
                   scale: float | None = None, sliding_window: int | None = None) -> torch.Tensor:
    """(1, H, L, D) attention of every token over its ancestors-or-self (and window), by ``plan``.

    ``query`` (1, H, L, D), ``key``/``value`` (1, KV, L, D) with H a multiple of KV; ``scale`` defaults to
    D^-0.5. Differentiable in query, key and value.
    """
    if query.shape[0] != 1 or query.shape[2] != plan.length:
        raise ValueError(f"tree attention: query {tuple(query.shape)} is not one row of the plan's {plan.length} "
                         f"tokens (batch 1, heads, tokens, head dim)")
    if query.device.type != "cpu":
        raise ValueError(f"attention implementation {TREE_ATTENTION!r} runs on the CPU; on {query.device.type} use "
                         f"'flex_attention' (block-sparse tree masks) or 'sdpa'")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"tree attention: {query.shape[1]} query heads are not a multiple of {key.shape[1]} "
                         f"key/value heads")
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    if sliding_window is None:
        parts = [(p, None, None) for p in plan.parts]
    else:
        parts = plan.windowed_parts(sliding_window, query.dtype)
    return _TreeAttention.apply(query, key, value, parts, scale)


# ------------------------------------------------------------------------------ the transformers interface
def tree_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           sliding_window=None, softcap=None, **kwargs):
    """transformers attention function: the tree when the call carries a plan, SDPA otherwise.

    Returns (output (B, L, H, D), None), as every transformers attention function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = kwargs.pop(PLAN_KWARG, None)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    name = type(module).__name__
    if softcap is not None:
        raise ValueError(f"{name}: attention logit soft-capping (softcap={softcap}, Gemma 2's "
                         f"attn_logit_softcapping) is not supported by {TREE_ATTENTION!r}; load the model with "
                         f"attn_implementation='eager'")
    if dropout and module.training:
        raise ValueError(f"{name}: attention dropout ({dropout}) in training is not supported by {TREE_ATTENTION!r}; "
                         f"set the model config's attention_dropout to 0 or use attn_implementation='sdpa'")
    for feature in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(feature) is not None:
            raise ValueError(f"{name}: {feature!r} (attention sinks / position biases) is not supported by "
                             f"{TREE_ATTENTION!r}")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise ValueError(f"{name}: non-causal attention cannot run on a tree")
    if attention_mask is not None:
        raise ValueError(f"{name}: a tree call got an attention mask of type {type(attention_mask).__name__}; "
                         f"pass the packed row through pvfast.model.forward.packed_forward")
    layer = getattr(module, "layer_idx", None)
    if plan.layer_windows is not None and layer is not None and plan.layer_windows[layer] != sliding_window:
        raise ValueError(f"{name} (layer {layer}): the model passes sliding_window={sliding_window} but its config "
                         f"gives {plan.layer_windows[layer]}; pvfast cannot tell which one the model means")
    out = tree_attention(query, key, value, plan, scale=scaling, sliding_window=sliding_window)
    plan.calls += 1
    return out.transpose(1, 2).contiguous(), None


def _tree_or_sdpa_mask(*args, **kwargs):
    """transformers mask function of ``pvfast_tree``: none for a tree call (the plan is the mask), SDPA's otherwise."""
    from transformers.masking_utils import sdpa_mask

    if getattr(kwargs.get("attention_mask"), _ROW_FLAG, False):
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register ``pvfast_tree`` with transformers (idempotent); returns the name for ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(TREE_ATTENTION, tree_attention_forward)
    AttentionMaskInterface.register(TREE_ATTENTION, _tree_or_sdpa_mask)
    return TREE_ATTENTION
