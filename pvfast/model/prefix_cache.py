"""Shared-prefix KV cache: the instruction's keys and values are computed once and read by every row.

Every pvfast prompt starts with the same ~3.5k-token instruction; only the direction line, the message and
the generation prompt differ (~50-150 tokens). The prompts of one generation call are split at their longest
common *token* prefix (token ids compared, never a character boundary: a BPE merge may straddle the end of
the instruction)::

    prompt_b  = [ prefix (P tokens, the same ids in every prompt) | suffix_b ]

    once      the prefix runs through the model       -> per layer K, V of shape (1, Hkv, P, D): one copy
    a batch   per layer a row cache (B, Hkv, S + max_new_tokens, D), preallocated, filled in place:
                  [ left padding | suffix_b | generated tokens ]
              positions P + (index among the row's real tokens), so a row reads as its unpadded prompt

Attention of a row-b query runs over ``[prefix keys | row-b keys]``: every prefix key is visible (it precedes
every suffix token), the row keys causally with the padding masked (a 4-D boolean mask over the row part,
built here and passed through transformers' mask code untouched). :func:`shared_prefix_attention` computes it:

- decoding (one query per row): the prefix scores of all rows and heads come from one batched matmul
  against the single prefix copy, the row scores from the row cache, then one softmax over both (log-sum-
  exp merge in float32). The prefix is read once per step instead of once per row;
- a batch's prefill (the suffixes): the prefix is expanded to the batch for that one call and the model's
  SDPA runs over ``[prefix | suffix]``.

It is the attention of the full prompt; only the order of floating-point sums differs (the generated tokens
are tested equal to Hugging Face ``generate`` on the full prompts). The function is registered with
transformers' ``AttentionInterface`` as :data:`ATTENTION_NAME`; during a shared-prefix forward the model's
``config._attn_implementation`` is switched to it (:func:`attention_implementation`) and the prefix rides
along as the keyword argument :data:`PREFIX_KWARG` (transformers hands extra forward kwargs to the attention
function). Models this cannot reproduce (sliding windows, soft-capping, attention sinks, mixed layer types,
an attention that does not go through the interface) are refused (:func:`unsupported_reason`, or
:class:`SharedPrefixUnsupported` from the first forward); generation then runs the full prompts.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch

#: Name of the attention function in transformers' AttentionInterface.
ATTENTION_NAME = "pvfast_shared_prefix"
#: Keyword argument that carries the :class:`PrefixKV` to the attention function.
PREFIX_KWARG = "pvfast_prefix"


class SharedPrefixUnsupported(RuntimeError):
    """The model's cache cannot be split into a shared prefix and per-row parts."""


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token id lists (0 for no rows)."""
    if not rows:
        return 0
    first = rows[0]
    n = min(len(r) for r in rows)
    for row in rows[1:]:
        k = 0
        while k < n and row[k] == first[k]:
            k += 1
        n = k
        if n == 0:
            break
    return n


def _text_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def unsupported_reason(model) -> str | None:
    """Why a shared-prefix cache cannot serve ``model`` (None when it can)."""
    config = _text_config(model)
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return f"layer types {sorted(set(layer_types))} (only full attention is supported)"
    if getattr(config, "use_sliding_window", False):  # other windows are checked per call (the kwarg)
        return "a sliding attention window"
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    return None


@dataclass
class PrefixKV:
    """Per-layer keys and values of the shared prefix, (1, Hkv, P, D) tensors on the model's device, plus
    float32 copies laid out for the decoding matmuls: keys transposed (Hkv, D, P), values (Hkv, P, D)."""

    length: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    keys_t32: list[torch.Tensor] = field(default_factory=list)
    values32: list[torch.Tensor] = field(default_factory=list)
    calls: int = 0  # attention calls served (the runner checks that every layer used the function)

    def __post_init__(self) -> None:
        self.keys_t32 = [k[0].float().transpose(1, 2).contiguous() for k in self.keys]
        self.values32 = [v[0].float().contiguous() for v in self.values]

    @classmethod
    @torch.inference_mode()
    def compute(cls, model, prefix_ids: Sequence[int], device, cache_argument: str = "cache") -> "PrefixKV":
        """Run the prefix once through ``model`` (its own attention implementation) and keep its cache."""
        if not prefix_ids:
            raise ValueError("PrefixKV.compute needs at least one prefix token")
        from transformers.cache_utils import DynamicCache

        ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=device)
        cache = DynamicCache()
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_argument: cache})
        layers = getattr(cache, "layers", None) or []
        if not layers or any(type(layer) is not _dynamic_layer() for layer in layers):
            raise SharedPrefixUnsupported(f"the model's cache layers are {sorted({type(x).__name__ for x in layers})}")
        if any(layer.keys is None or layer.keys.shape[-2] != len(prefix_ids) for layer in layers):
            raise SharedPrefixUnsupported("a cache layer does not hold every prefix position")
        return cls(len(prefix_ids), [layer.keys for layer in layers], [layer.values for layer in layers])


def _decode_attention(prefix: PrefixKV, layer: int, query, key, value, row_mask, scale: float) -> torch.Tensor:
    """One query per row over ``[prefix | row]`` (module docstring); returns (B, 1, H, D) in query's dtype.

    query (B, H, 1, D); key, value (B, Hkv, S, D); row_mask (B, 1, 1, S) bool. Query head h reads kv head
    h // groups, as transformers' ``repeat_kv`` lays them out.
    """
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    q = query.float().reshape(batch, kv_heads, groups, dim) * scale
    qp = q.transpose(0, 1).reshape(kv_heads, batch * groups, dim)
    sp = torch.bmm(qp, prefix.keys_t32[layer])  # (Hkv, B*g, P): all rows against the one prefix copy
    sr = torch.matmul(q, key.float().transpose(-1, -2))  # (B, Hkv, g, S)
    sr = sr.masked_fill(~row_mask.reshape(batch, 1, 1, length), float("-inf"))
    mp = sp.amax(-1).reshape(kv_heads, batch, groups).transpose(0, 1)  # (B, Hkv, g)
    m = torch.maximum(mp, sr.amax(-1))  # finite: every query sees the prefix
    ep = torch.exp(sp - m.transpose(0, 1).reshape(kv_heads, batch * groups, 1))
    er = torch.exp(sr - m.unsqueeze(-1))
    denom = ep.sum(-1).reshape(kv_heads, batch, groups).transpose(0, 1) + er.sum(-1)
    op = torch.bmm(ep, prefix.values32[layer]).reshape(kv_heads, batch, groups, dim).transpose(0, 1)
    out = (op + torch.matmul(er, value.float())) / denom.unsqueeze(-1)  # (B, Hkv, g, D)
    return out.reshape(batch, 1, heads, dim).to(query.dtype)


def shared_prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    """Attention over ``[shared prefix | row keys]`` (module docstring), with transformers' signature.

    query (B, H, Q, D); key, value (B, Hkv, S, D), the row part only; attention_mask (B, 1, Q, S) bool over
    the row part, True = may attend; the prefix comes in ``kwargs[PREFIX_KWARG]``. Returns
    ((B, Q, H, D), None) like transformers' own attention functions.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix: PrefixKV | None = kwargs.pop(PREFIX_KWARG, None)
    if prefix is None:  # not a shared-prefix call: plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise SharedPrefixUnsupported("soft-capped attention or attention sinks")
    window = kwargs.get("sliding_window")
    if window is not None and prefix.length + key.shape[2] > window:
        raise SharedPrefixUnsupported(f"a sliding window of {window} tokens")
    layer = module.layer_idx
    prefix.calls += 1
    batch, _, queries, dim = query.shape
    if queries == 1:
        scale = scaling if scaling is not None else dim ** -0.5
        return _decode_attention(prefix, layer, query, key, value, attention_mask, scale), None
    # prefill of a batch's suffixes: the prefix expanded for this one call, then the model's SDPA
    keys = torch.cat([prefix.keys[layer].expand(batch, -1, -1, -1), key], dim=2)
    values = torch.cat([prefix.values[layer].expand(batch, -1, -1, -1), value], dim=2)
    visible = torch.ones((batch, 1, queries, prefix.length), dtype=torch.bool, device=query.device)
    mask = torch.cat([visible, attention_mask], dim=-1)
    return sdpa_attention_forward(module, query, keys, values, mask, dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)


_registered = False


def register_attention() -> None:
    """Register :func:`shared_prefix_attention` with transformers (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
        _registered = True


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Switch ``model``'s attention implementation to ``name`` for the duration of the block."""
    configs = []
    for config in (model.config, _text_config(model)):
        if all(config is not c for c in configs):
            configs.append(config)
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        for c, old in zip(configs, saved):
            c._attn_implementation = old


def _dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


@functools.lru_cache(maxsize=1)
def _row_layer_class():
    DynamicLayer = _dynamic_layer()

    class RowLayer(DynamicLayer):
        """One layer of a batch's row cache: preallocated (B, Hkv, capacity, D) buffers filled left to right;
        ``update`` writes the new positions in place and returns views of the filled part (no per-step
        concatenation). The prefix is not in it: the attention function reads it from :class:`PrefixKV`."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self.length = 0

        def lazy_initialization(self, key_states, value_states) -> None:
            batch, heads, _, _ = key_states.shape
            self.device = key_states.device
            self.keys = key_states.new_empty(batch, heads, self.capacity, key_states.shape[-1])
            self.values = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            if self.length + n > self.capacity:
                raise RuntimeError(f"row cache full ({self.capacity} positions)")
            self.keys[:, :, self.length:self.length + n] = key_states
            self.values[:, :, self.length:self.length + n] = value_states
            self.length += n
            return self.keys[:, :, :self.length], self.values[:, :, :self.length]

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.length + query_length, 0

        def batch_select_indices(self, indices) -> None:
            if self.is_initialized:
                self.keys = self.keys[indices]
                self.values = self.values[indices]

    return RowLayer


def row_cache(num_layers: int, capacity: int):
    """A transformers ``Cache`` of row layers (the per-row part of a batch; the prefix is not in it)."""
    from transformers.cache_utils import Cache

    layer = _row_layer_class()
    return Cache(layers=[layer(capacity) for _ in range(num_layers)])
