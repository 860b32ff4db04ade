"""Shared-prefix KV cache: the instruction's keys and values are computed once and reused by every row.

Every pvfast prompt starts with the same ~3.5k-token instruction; only the direction line, the message and
the generation prompt differ (~50-150 tokens). The prompts of one generation call are split at their longest
common *token* prefix (token ids compared, never a character boundary: a BPE merge may straddle the end of
the instruction)::

    prompt_b  = [ prefix (P tokens, the same ids in every prompt) | suffix_b ]

    once      the prefix runs through the model             -> per layer K, V of shape (1, Hkv, P, D)
    a batch   per layer one preallocated buffer (B, Hkv, P + S + max_new_tokens, D):
                  [ prefix (copied) | left padding | suffix_b | generated tokens ]
              attention mask (B, P + S + t): 1 on the prefix and the real tokens, 0 on the padding
              positions P + (index among the row's real suffix tokens), so a row reads as its unpadded prompt

The batch then runs through the model's own attention (SDPA, eager, ...) and mask code with this cache
(:class:`RowLayer` implements transformers' cache-layer interface), exactly as Hugging Face ``generate``
continues from a cache: the same computation as the full prompt, except that the prefix and the suffix
are computed in two passes (the order of floating-point sums differs; the generated tokens are tested
equal to ``generate`` on the full prompts). Each batch pays a memory copy of the prefix instead of a
~3.5k-token forward per message, and each decoding step writes in place instead of concatenating a new
cache tensor.

Models whose cache is not one plain key/value tensor pair per layer (sliding windows, linear-attention or
mixed layers) are refused by :func:`unsupported_reason`; generation then runs the full prompts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch


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
    if getattr(config, "use_sliding_window", False):
        return "a sliding attention window"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    return None


@dataclass
class PrefixKV:
    """Per-layer keys and values of the shared prefix: lists of (1, Hkv, P, D) tensors on the model's device."""

    length: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    @torch.inference_mode()
    def compute(cls, model, prefix_ids: Sequence[int], device, cache_argument: str = "cache") -> "PrefixKV":
        """Run the prefix once through ``model`` and keep its cache."""
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


def _dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


@functools.lru_cache(maxsize=1)
def _row_layer_class():
    DynamicLayer = _dynamic_layer()

    class RowLayer(DynamicLayer):
        """One layer of a batch's cache: preallocated (B, Hkv, capacity, D) buffers that start with a copy of
        the shared prefix and are filled left to right; ``update`` writes the new positions in place and
        returns views of the filled part (no per-step concatenation)."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, batch: int, capacity: int):
            super().__init__()
            _, heads, length, _ = keys.shape
            self.device = keys.device
            self.keys = keys.new_empty(batch, heads, capacity, keys.shape[-1])
            self.values = values.new_empty(batch, heads, capacity, values.shape[-1])
            self.keys[:, :, :length] = keys
            self.values[:, :, :length] = values
            self.length = length
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:  # initialised in __init__
            raise AssertionError("RowLayer is created initialised")

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            if self.length + n > self.keys.shape[-2]:
                raise RuntimeError(f"row cache full ({self.keys.shape[-2]} positions)")
            self.keys[:, :, self.length:self.length + n] = key_states
            self.values[:, :, self.length:self.length + n] = value_states
            self.length += n
            return self.keys[:, :, :self.length], self.values[:, :, :self.length]

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.length + query_length, 0

        def batch_select_indices(self, indices) -> None:
            self.keys = self.keys[indices]
            self.values = self.values[indices]

    return RowLayer


def batch_cache(prefix: PrefixKV, batch: int, capacity: int):
    """A transformers ``Cache`` for ``batch`` rows whose first ``prefix.length`` positions hold the prefix."""
    from transformers.cache_utils import Cache

    layer = _row_layer_class()
    return Cache(layers=[layer(k, v, batch, capacity) for k, v in zip(prefix.keys, prefix.values)])
